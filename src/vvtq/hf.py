"""Hugging Face ``transformers`` image classifiers as vvtq models (the ``hf`` extra: ``pip install 'vvtq[hf]'``).

A *source* is a ``save_pretrained`` folder (``config.json`` and safetensors weights) or ``hf:ID`` (a hub id, or
``hf:FOLDER``); transformers loads it (``AutoConfig``, ``AutoModelForImageClassification.from_pretrained``). The
model vvtq trains is ``HFClassifier``: the HF model as its child ``hf``, its forward returning the logits tensor
(the one place where HF's output object is read), so the loop, evaluation, analysis and export see a plain
classifier.

The spec (``vvtq.spec.ModelSpec``) of an HF model keeps its architecture in ``model_kwargs["hf"]``: the model class
and the whole config as a dict (``describe``), so that a checkpoint or a packed export rebuilds the model without
the source. The other ``model_kwargs`` set config fields: ``num_classes`` (``num_labels``), ``in_chans``
(``num_channels``), ``img_size`` (``image_size``), or any field of the model's config by its own name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError

PREFIX = "hf:"
EXTRA = "pip install 'vvtq[hf]'"
_KWARGS = {"num_classes": "num_labels", "in_chans": "num_channels", "img_size": "image_size"}


def transformers_module():
    """``transformers``, or a ``ConfigError`` naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"Hugging Face models need the transformers package: {EXTRA}") from None
    return transformers


def is_hf_source(name: str, model_kwargs: dict[str, Any] | None = None) -> bool:
    """Whether ``name`` (with ``model_kwargs``) is an HF model: ``hf:ID``, a folder with a ``config.json``, or a
    recorded architecture (``model_kwargs["hf"]``)."""
    if model_kwargs and "hf" in model_kwargs:
        return True
    if not isinstance(name, str):
        return False
    if name.startswith(PREFIX):
        return True
    config = Path(name) / "config.json"
    if not config.is_file():
        return False
    try:  # a transformers config names its model_type; timm's hub folders hold a config.json too
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and "architecture" not in data


def _location(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


class HFClassifier(nn.Module):
    """An HF image classifier (child ``hf``) whose forward returns its logits: ``hf(pixel_values=x).logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model

    def forward(self, x: Tensor) -> Tensor:
        return self.hf(pixel_values=x).logits


def _apply(config, kwargs: dict[str, Any], where: str, drop_path: float = 0.0) -> bool:
    """Set ``kwargs`` (vvtq's names or the config's own) on ``config``; whether a value changed."""
    changed = False
    items = dict(kwargs)
    items.pop("hf", None)
    if drop_path:
        if not hasattr(config, "drop_path_rate"):
            raise ConfigError(f"model {where!r}: {type(config).__name__} has no stochastic depth; set drop_path: 0")
        items["drop_path_rate"] = drop_path
    for key, value in items.items():
        attr = _KWARGS.get(key, key)
        if not hasattr(config, attr):
            raise ConfigError(f"model {where!r}: {type(config).__name__} has no setting {key!r}")
        if getattr(config, attr) != value:
            setattr(config, attr, value)
            changed = True
    return changed


def _class_name(config, where: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    known = names.get(config.model_type)
    if known is None:
        raise ConfigError(f"model {where!r}: transformers has no image classifier for model type "
                          f"{config.model_type!r}")
    known = (known,) if isinstance(known, str) else tuple(known)
    return next((a for a in config.architectures or () if a in known), known[0])


def _config(name: str):
    T = transformers_module()
    try:
        return T.AutoConfig.from_pretrained(_location(name))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {name!r}: transformers cannot read its config ({' '.join(str(exc).split())[:200]})"
                          ) from None


def _record(class_name: str, config) -> dict[str, Any]:
    return {"class": class_name, "config": json.loads(config.to_json_string(use_diff=False))}


def describe(name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The architecture record of an HF source: ``{"class": model class name, "config": config dict}``, with
    ``model_kwargs`` applied (``model_kwargs["hf"]`` of its spec)."""
    config = _config(name)
    _apply(config, model_kwargs, name)
    return _record(_class_name(config, name), config)


def record_of(model: HFClassifier) -> dict[str, Any]:
    """The architecture record (``describe``'s) of a live HF model."""
    return _record(type(model.hf).__name__, model.hf.config)


def build_hf(name: str, model_kwargs: dict[str, Any], drop_path: float = 0.0) -> HFClassifier:
    """The model of an HF source with its weights (``from_pretrained``), or, when ``model_kwargs`` holds a recorded
    architecture (``"hf"``), that architecture freshly initialised (a checkpoint's weights go in next)."""
    T = transformers_module()
    record = model_kwargs.get("hf")
    if record is None:
        config = _config(name)
        before = {k: getattr(config, k, None) for k in ("image_size", "num_channels", "patch_size")}
        changed = _apply(config, model_kwargs, name, drop_path)
        moved = [f"{k} {v} -> {getattr(config, k, None)}" for k, v in before.items() if getattr(config, k, None) != v]
        if moved:  # from_pretrained would re-initialise the position embeddings or the patch projection at random
            raise ConfigError(f"model {name!r}: its pretrained weights are for another input ({', '.join(moved)}); "
                              "train at the source's image size and channels (only the class count may change)")
        model = T.AutoModelForImageClassification.from_pretrained(  # fp32, as the rebuild from a checkpoint is
            _location(name), config=config, ignore_mismatched_sizes=changed, dtype=torch.float32)
    else:
        cls = getattr(T, str(record.get("class")), None)
        if not (isinstance(cls, type) and issubclass(cls, T.PreTrainedModel)):
            raise ConfigError(f"model {name!r}: transformers has no model class {record.get('class')!r}")
        config = cls.config_class.from_dict(dict(record["config"]))
        _apply(config, model_kwargs, name, drop_path)
        model = cls(config)
    mask_token = getattr(getattr(getattr(model, model.base_model_prefix, None), "embeddings", None), "mask_token", None)
    if isinstance(mask_token, nn.Parameter):  # unused by a classifier: DDP would wait for its gradient forever
        mask_token.requires_grad_(False)
    return HFClassifier(model)


def input_fields(model: HFClassifier, name: str) -> dict[str, Any]:
    """``img_size``, ``mean`` / ``std`` (the source's image processor, where it has one) and ``classes`` (the
    config's labels, unless they are transformers' placeholders ``LABEL_i``) of an HF model."""
    config = model.hf.config
    size = config.image_size
    fields: dict[str, Any] = {"img_size": int(size[-1] if isinstance(size, (tuple, list)) else size)}
    labels = [config.id2label[i] for i in sorted(config.id2label)]
    if labels and labels != [f"LABEL_{i}" for i in range(len(labels))]:
        fields["classes"] = [str(label) for label in labels]
    try:
        proc = transformers_module().AutoImageProcessor.from_pretrained(_location(name))
    except (OSError, ValueError, ImportError):
        return fields
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if mean is not None and std is not None and len(mean) == len(std) == int(config.num_channels):
        fields.update(mean=[float(v) for v in mean], std=[float(v) for v in std])
    return fields
