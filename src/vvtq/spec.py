"""``ModelSpec``: what a checkpoint (and a packed export) records about its model.

The architecture (a timm model name and the keyword arguments it is built with), the quantization config (a
``QuantConfig`` dict, or None for a floating-point model), the input (image size, normalisation mean and std),
the class names and the identity of the training set (``data_source(meta)`` reads from it which images the model
was trained and validated on). ``to_dict`` gives the checkpoint metadata's keys
(``model``, ``model_kwargs``, ``quant``, ``img_size``, ``mean``, ``std``, ``classes``, ``dataset``) and
``from_dict`` reads them back from any checkpoint's metadata, old ones included (other keys are ignored).
``ModelSpec.of(model)`` tells the spec of a live model: the one ``vvtq.build_model`` / ``vvtq.load_model``
recorded on it, or, for a model made with ``timm.create_model``, the one timm's own config implies.

A Hugging Face model (``name``: a ``save_pretrained`` folder or ``hf:ID``; ``vvtq.hf``) records its architecture in
``model_kwargs["hf"]`` (the model class and the whole config), read from the source when the spec is made, so that
its checkpoints and exports rebuild it without the source.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .errors import ConfigError
from .hf import HFClassifier, is_hf_source, record_of

_KEYS = ("model", "model_kwargs", "quant", "img_size", "mean", "std", "classes", "dataset")
_DEFAULT_MEAN, _DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm's defaults


@dataclass
class ModelSpec:
    """A model as a checkpoint records it; ``vvtq.build_model(spec)`` builds it (quantized when ``quant`` is set)."""

    name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    quant: dict[str, Any] | None = None
    img_size: int | None = None
    mean: list[float] = field(default_factory=lambda: list(_DEFAULT_MEAN))
    std: list[float] = field(default_factory=lambda: list(_DEFAULT_STD))
    classes: list[str] | None = None
    dataset: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"model spec: the model name must be a non-empty string, not {self.name!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model spec: model_kwargs must be a mapping, not {self.model_kwargs!r}")
        self.model_kwargs = dict(self.model_kwargs)
        if "hf" not in self.model_kwargs and is_hf_source(self.name):
            from .hf import describe

            self.model_kwargs["hf"] = describe(self.name, self.model_kwargs)
        self.mean, self.std = [float(v) for v in self.mean], [float(v) for v in self.std]
        self.img_size = None if self.img_size is None else int(self.img_size)

    @property
    def quantized(self) -> bool:
        """Whether the model is quantized (has a quantization config)."""
        return self.quant is not None

    def quant_config(self):
        """The ``QuantConfig`` of a quantized spec, None for a floating-point one."""
        from .quant import QuantConfig

        return None if self.quant is None else QuantConfig.from_dict(self.quant)

    def with_quant(self, config) -> ModelSpec:
        """This spec with another quantization config (a ``QuantConfig``, its dict, or None: floating point)."""
        quant = config if config is None or isinstance(config, dict) else config.to_dict()
        return replace(self, quant=quant)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint metadata keys of this spec (JSON-serialisable)."""
        return {"model": self.name, "model_kwargs": dict(self.model_kwargs), "quant": self.quant,
                "img_size": self.img_size, "mean": list(self.mean), "std": list(self.std),
                "classes": None if self.classes is None else list(self.classes), "dataset": self.dataset}

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> ModelSpec:
        """The spec in a checkpoint's metadata (or a packed export's ``arch``); keys it does not know are ignored."""
        if not isinstance(meta, dict) or "model" not in meta:
            raise ConfigError("model spec: the metadata names no model")
        known = {k: meta[k] for k in _KEYS if meta.get(k) is not None}
        known["name"] = known.pop("model")
        return cls(**known)

    @classmethod
    def of(cls, model: nn.Module, **overrides: Any) -> ModelSpec:
        """The spec of a live model, with its current quantization config (``model.vvtq_config``).

        The architecture comes from the spec ``build_model`` / ``load_model`` recorded (``model.vvtq_spec``), or
        else from timm's config of the model (its name, classes, input channels, input size and normalisation).
        ``overrides`` set fields (e.g. ``img_size``, ``mean``, ``std``, ``classes``, ``model_kwargs``).
        """
        spec = getattr(model, "vvtq_spec", None)
        if spec is None:
            spec = _from_hf(model) if isinstance(model, HFClassifier) else _from_timm(model)
        config = getattr(model, "vvtq_config", None)
        spec = spec.with_quant(config) if config is not None else spec
        return replace(spec, **overrides) if overrides else spec


@dataclass(frozen=True)
class DataSource:
    """The images a model was trained and validated on: ``data`` (a ``build_dataset`` name or image folder, None
    where unknown), ``root`` (None: the dataset's default folder), ``val_split`` (``test``, ``val`` or
    ``holdout``) and ``holdout`` (training images put aside, the ones ``val_split: holdout`` scores on)."""

    data: str | None
    root: str | None = None
    val_split: str = "test"
    holdout: int = 0

    def given(self, data: str | None = None, root: str | None = None, val_split: str | None = None,
              holdout: int | None = None) -> DataSource:
        """This source with the facts given (not None) replaced, e.g. a command's ``--data`` / ``--data-root``;
        another dataset than the recorded one does not inherit the recorded root."""
        other = data is not None and data != self.data
        return DataSource(self.data if data is None else data, root if root is not None or other else self.root,
                          val_split or self.val_split, self.holdout if holdout is None else int(holdout))


def data_source(meta: dict[str, Any]) -> DataSource:
    """The images the model of checkpoint metadata ``meta`` (or a ``ModelSpec.to_dict()``) was trained and
    validated on, from its spec's ``dataset`` (the training set's ``identity()``). The one place that reads a
    checkpoint's training settings: a checkpoint written before the spec recorded ``data``, ``holdout`` and
    ``val_split`` takes the facts its spec lacks from its ``train_config``."""
    ds, tc = meta.get("dataset") or {}, meta.get("train_config") or {}
    return DataSource(data=ds.get("data") or tc.get("data") or _named_data(ds),
                      root=ds.get("root") or tc.get("data_root") or None,
                      val_split=ds.get("val_split") or tc.get("val_split") or "test",
                      holdout=int(ds["holdout"] if "holdout" in ds else tc.get("holdout") or 0))


def _from_hf(model: HFClassifier) -> ModelSpec:
    record = record_of(model)
    name = record["config"].get("_name_or_path") or record["class"]
    size = model.hf.config.image_size
    return ModelSpec(f"hf:{name}", {"hf": record}, img_size=size[-1] if isinstance(size, (tuple, list)) else size)


def _named_data(identity: dict[str, Any]) -> str | None:
    """The dataset an identity names, for a model saved without a training config (``save_model`` after a loop of
    one's own, from a spec that predates the ``data`` field): Fashion-MNIST, or an image folder's root."""
    from .data import FASHION_MNIST_NAMES

    name = str(identity.get("name") or "").split("[")[0]
    if name in FASHION_MNIST_NAMES:
        return "fashion_mnist"
    return identity.get("root") or None if name == "image_folder" else None


def _from_timm(model: nn.Module) -> ModelSpec:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if name is None:
        raise ConfigError(f"cannot tell which model this {type(model).__name__} is: build it with "
                          "vvtq.build_model(name, ...) or pass spec=vvtq.ModelSpec(name, model_kwargs, ...)")
    kwargs: dict[str, Any] = {}
    if getattr(model, "num_classes", None) is not None and model.num_classes != cfg.get("num_classes"):
        kwargs["num_classes"] = int(model.num_classes)
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    in_chans = getattr(proj, "in_channels", None)
    if in_chans is not None and in_chans != (cfg.get("input_size") or (3,))[0]:
        kwargs["in_chans"] = int(in_chans)
    fields = timm_input(model)
    if fields["img_size"] is not None and fields["img_size"] != (cfg.get("input_size") or [None])[-1]:
        kwargs["img_size"] = fields["img_size"]
    return ModelSpec(name, kwargs, **fields)


def timm_input(model: nn.Module) -> dict[str, Any]:
    """The ``img_size`` (and ``mean``, ``std``, where timm's config has them) of a timm model."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    img = getattr(getattr(model, "patch_embed", None), "img_size", None) or (cfg.get("input_size") or [None])[-1]
    fields: dict[str, Any] = {"img_size": img[-1] if isinstance(img, (tuple, list)) else img}
    if "mean" in cfg and "std" in cfg:
        fields.update(mean=list(cfg["mean"]), std=list(cfg["std"]))
    return fields
