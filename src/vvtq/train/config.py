"""``TrainConfig``: a training recipe, read from a YAML file (a path, or the name of a recipe shipped in
``vvtq/recipes``) with command-line overrides."""
from __future__ import annotations

import copy
import difflib
import inspect
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["ConfigError", "TrainConfig", "settings_help", "sub_mapping_keys"]


@dataclass
class TrainConfig:
    """Every knob of one training run. FP training is ``quant: null``; QAT sets ``quant``.

    ``quant`` holds ``preset`` (``lsq``/``vvtq``), ``wbits``, ``abits`` and any other ``QuantConfig`` field,
    plus ``overrides_file`` (a mixed-precision file from ``vvtq analyze --bit-budget``).
    ``teacher`` holds ``source`` (``none``: hard labels; ``live``: a checkpoint, or a list of them averaged, run on
    the same crops;
    ``file``: soft labels from ``vvtq softlabels``), ``checkpoint``, ``softlabels`` and ``hard_weight``.
    """

    # model
    model: str = "mini_deit"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    init_from: str | None = None  # FP checkpoint whose weights start QAT
    drop_path: float = 0.0
    # data
    data: str = "fashion_mnist"
    data_root: str | None = None
    val_split: str = "test"  # or "holdout": the ``holdout`` training images put aside (data/splits.py)
    holdout: int = 0  # training images held out from training (a fixed choice); scored when val_split=holdout
    img_size: int = 28
    num_crops: int = 1
    single_crop_frac: float = 0.0  # the last fraction of the steps takes 1 crop an image (batch_size images a step)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    train_subset: int | None = None
    val_subset: int | None = None
    num_workers: int = 0
    # optimisation
    epochs: float = 10
    batch_size: int = 128  # crops per global batch: batch_size / num_crops images
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"  # or "sgd": Nesterov SGD with momentum betas[0] (the CNN teacher's optimiser)
    label_smoothing: float = 0.0
    clip_grad: float | None = 1.0
    quant_lr_scale: float = 1.0  # lr of the quantizers' step sizes and offsets, as a multiple of ``lr``
    weight_quant_lr_scale: float | None = None  # the weight quantizers' step sizes (None: quant_lr_scale; 0: fixed)
    seed: int = 0
    channels_last: bool = False  # NHWC memory layout (convolutional models run ~1.4x faster on the CPU)
    # quantization-aware training
    quant: dict[str, Any] | None = None
    calib_batches: int = 4
    teacher: dict[str, Any] = field(default_factory=lambda: {"source": "none"})
    regularizer: dict[str, Any] | None = None  # {"lambda_max": 0.01, "start_frac": 0.25}
    oscillation: dict[str, Any] | None = None  # {"every": 1, "freeze_threshold": null}
    anneal: dict[str, Any] | None = None  # confidence-guided annealing (vvtq.anneal): {"start_frac": 0.9}
    # bookkeeping
    out: str = "runs/run"
    log_every: int = 20
    eval_every: int = 1
    ckpt_every_steps: int = 0
    device: str = "auto"
    progress: bool = True
    max_steps: int | None = None  # stop early (tests); the schedule still spans ``epochs``

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None,
                  settings: dict[str, Any] | None = None) -> TrainConfig:
        """Read a recipe, a YAML file or a shipped recipe's name (a file that exists wins; see ``vvtq.recipes``),
        then apply the ``key=value`` ``overrides`` (values parsed as YAML) and then ``settings`` (``{key: value}``,
        values as given; ``a.b`` keys allowed). Both are checked like the recipe itself."""
        from ..recipes import read_recipe

        return cls._from_text(*read_recipe(path), overrides, settings)

    @classmethod
    def from_recipe(cls, name: str, overrides: list[str] | None = None,
                    settings: dict[str, Any] | None = None) -> TrainConfig:
        """A recipe shipped with vvtq, by name only (a file of that name in the working directory is ignored);
        overrides and settings as in ``from_yaml``."""
        from ..recipes import recipe_text

        return cls._from_text(f"recipe {name}", recipe_text(name), overrides, settings)

    @classmethod
    def _from_text(cls, where: str, text: str, overrides: list[str] | None,
                   settings: dict[str, Any] | None) -> TrainConfig:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a recipe is a mapping of settings")
        return cls.from_dict(_apply_overrides(data, [*(overrides or []), *(settings or {}).items()]))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        data = copy.deepcopy(data)
        for f in fields(cls):
            if f.name in data:
                data[f.name] = _coerce(f.name, f.type, data[f.name])
        cfg = cls(**data)
        cfg.crop_scale, cfg.betas = tuple(cfg.crop_scale), tuple(cfg.betas)
        return cfg.validate()

    def apply(self, overrides: list[str]) -> TrainConfig:
        """A copy with ``key=value`` overrides applied (see ``_apply_overrides``)."""
        return TrainConfig.from_dict(_apply_overrides(self.to_dict(), overrides))

    def validate(self) -> TrainConfig:
        """Check every setting, and every key of the mapping-valued ones, without reading any data; return
        ``self`` or raise one ``ConfigError``."""
        self._check_mappings()
        if self.num_crops < 1 or self.batch_size < 1:
            raise ConfigError(f"num_crops and batch_size must be >= 1; got {self.num_crops}, {self.batch_size}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale must be [lo, hi] with 0 < lo <= hi <= 1; got {list(self.crop_scale)}")
        if not 0.0 <= self.single_crop_frac < 1.0:
            raise ConfigError(f"single_crop_frac must be in [0, 1); got {self.single_crop_frac}")
        if self.single_crop_frac and self.num_crops == 1:
            raise ConfigError("single_crop_frac is a final phase of one crop an image after several: it needs "
                              "num_crops > 1; got num_crops=1")
        if self.batch_size % self.num_crops:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of num_crops ({self.num_crops})")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be adamw or sgd; got {self.optimizer!r}")
        if self.epochs <= 0 or self.lr <= 0:
            raise ConfigError("epochs and lr must be positive")
        source = (self.teacher or {}).get("source", "none")
        if source not in ("none", "live", "file"):
            raise ConfigError(f"teacher.source must be none, live or file; got {source!r}")
        if self.holdout < 0:
            raise ConfigError(f"holdout must be a number of images >= 0; got {self.holdout}")
        if self.quant_lr_scale <= 0 or (self.weight_quant_lr_scale or 0) < 0:
            raise ConfigError(f"quant_lr_scale must be positive and weight_quant_lr_scale not negative; got "
                              f"{self.quant_lr_scale}, {self.weight_quant_lr_scale}")
        if source == "none" and (unused := [k for k in ("checkpoint", "softlabels") if self.teacher.get(k)]):
            raise ConfigError(f"teacher.{unused[0]} is set but teacher.source is none (hard labels), so it would be "
                              "ignored: set teacher.source to live (a checkpoint) or file (soft labels), or drop it")
        if source == "live" and not self.teacher.get("checkpoint"):
            raise ConfigError("teacher.source=live needs teacher.checkpoint")
        if source == "file" and not self.teacher.get("softlabels"):
            raise ConfigError("teacher.source=file needs teacher.softlabels (made by `vvtq softlabels`)")
        from ..quant import QuantizerError

        try:
            self.quant_config()
        except QuantizerError as exc:
            raise ConfigError(f"quant: {exc}") from None
        return self

    def _check_mappings(self) -> None:
        """Every key of ``quant``, ``teacher``, ``regularizer``, ``oscillation`` and ``anneal`` is one its consumer
        takes, and its values are accepted: a typo fails here, before any data is read, not after calibration."""
        from ..analysis.oscillation import OscillationTracker
        from ..anneal import ConfidenceAnnealer
        from ..regularize import ModelBinRegularizer

        for name, known in sub_mapping_keys().items():
            mapping = getattr(self, name)
            if mapping is None:
                continue
            if not isinstance(mapping, dict):
                raise ConfigError(f"setting {name!r} must be a mapping (or null); got {mapping!r}")
            unknown = sorted(map(str, set(mapping) - set(known)))
            if unknown:
                close = [c[0] for k in unknown if (c := difflib.get_close_matches(k, known, n=1))]
                hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
                raise ConfigError(f"unknown key(s) in {name}: {', '.join(unknown)}{hint}; valid keys: "
                                  f"{', '.join(known)}")
        if self.model_kwargs is not None and not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"setting 'model_kwargs' must be a mapping; got {self.model_kwargs!r}")
        try:
            if self.regularizer is not None:
                ModelBinRegularizer([], 1, **self.regularizer)
            if self.oscillation is not None:
                OscillationTracker([], **{k: v for k, v in self.oscillation.items() if k != "dtype"})
            if self.anneal is not None:
                ConfidenceAnnealer([], 1, **self.anneal)
            if not 0.0 <= float((self.teacher or {}).get("hard_weight", 0.0)) <= 1.0:
                raise ValueError(f"teacher.hard_weight must be in [0, 1]; got {self.teacher['hard_weight']}")
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None

    def quant_config(self):
        """The ``QuantConfig`` this recipe asks for, or ``None`` for FP training."""
        if self.quant is None:
            return None
        from ..quant import QuantConfig

        spec = dict(self.quant)
        preset = spec.pop("preset", "vvtq")
        overrides_file = spec.pop("overrides_file", None)
        cfg = QuantConfig.preset(preset, **spec)
        return cfg.with_overrides_file(overrides_file) if overrides_file else cfg

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["crop_scale"], data["betas"] = list(self.crop_scale), list(self.betas)
        return data


def _coerce(name: str, kind: str, value: Any) -> Any:
    """``value`` as the type ``kind`` (a field's annotation, as text) of the setting ``name``, or ``ConfigError``.

    YAML reads ``1e-3`` as a string: numbers given as strings are converted; an integral float is accepted for
    an ``int`` and a number for a ``str`` (``out=123``); anything else of the wrong type is refused here, before
    it can fail somewhere inside training."""
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if value is None:
        if optional or base.startswith("dict"):
            return None
        raise ConfigError(f"setting {name!r} cannot be null")
    if base in ("int", "float"):
        if isinstance(value, str):
            try:
                value = float(value) if base == "float" else int(value)
            except ValueError:
                raise ConfigError(f"setting {name!r} must be a number; got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"setting {name!r} must be a number; got {value!r}")
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"setting {name!r} must be an integer; got {value!r}")
            return int(value)
        return value
    if base == "bool" and not isinstance(value, bool):
        raise ConfigError(f"setting {name!r} must be true or false; got {value!r}")
    if base == "str":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"setting {name!r} must be a string; got {value!r}")
    if base.startswith("tuple"):
        try:
            pair = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            pair = ()
        if len(pair) != 2 or isinstance(value, (str, dict)):
            raise ConfigError(f"setting {name!r} must be a pair of numbers [a, b]; got {value!r}")
        return pair
    return value


def sub_mapping_keys() -> dict[str, tuple[str, ...]]:
    """The keys each mapping-valued setting takes, read from the code that consumes them."""
    from ..analysis.oscillation import OscillationTracker
    from ..anneal import ConfidenceAnnealer
    from ..quant import QuantConfig
    from ..regularize import ModelBinRegularizer

    return {"quant": ("preset", "overrides_file", *(f.name for f in fields(QuantConfig))),
            "teacher": ("source", "checkpoint", "softlabels", "hard_weight"),
            "regularizer": _params(ModelBinRegularizer, skip=2),
            "oscillation": _params(OscillationTracker, skip=1),
            "anneal": _params(ConfidenceAnnealer, skip=2)}


def settings_help() -> str:
    """Every setting of a recipe, with the keys of the mapping-valued ones (for ``vvtq train --help``)."""
    subs = sub_mapping_keys()
    return ", ".join(f"{f.name}.{{{', '.join(subs[f.name])}}}" if f.name in subs else f.name
                     for f in fields(TrainConfig))


def _params(cls: type, skip: int) -> tuple[str, ...]:
    """The keyword parameters of ``cls.__init__`` after ``self`` and the first ``skip`` positional ones."""
    return tuple(list(inspect.signature(cls.__init__).parameters)[1 + skip:])


def _apply_overrides(data: dict[str, Any], overrides: list[str | tuple[str, Any]]) -> dict[str, Any]:
    """Apply overrides to a recipe mapping: ``"key=value"`` strings (values parsed as YAML) or ``(key, value)``
    pairs (values as given); ``a.b`` sets one key inside the mapping ``a``."""
    data = copy.deepcopy(data)
    names = {f.name for f in fields(TrainConfig)}
    for item in overrides:
        if isinstance(item, tuple):
            key, value = item
            item, raw = f"{key}={value}", None
        elif "=" in item:
            key, raw = item.split("=", 1)
        else:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parts = key.strip().split(".")
        if parts[0] not in names:
            close = difflib.get_close_matches(parts[0], sorted(names), n=3)
            hint = f" (close names: {', '.join(close)})" if close else " (`vvtq train --help` lists the settings)"
            raise ConfigError(f"override {item!r}: unknown setting {parts[0]!r}{hint}")
        if raw is not None:
            try:
                value = yaml.safe_load(raw) if raw != "" else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {item!r}: the value is not valid YAML "
                                  f"({' '.join(str(exc).split())})") from None
        target = data
        for part in parts[:-1]:
            if target.get(part) is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            target = target[part]
        target[parts[-1]] = value
    return data
