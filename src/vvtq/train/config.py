"""``TrainConfig``: a training recipe, read from a YAML file in ``configs/`` with command-line overrides."""
from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe file or an override is invalid."""


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
    label_smoothing: float = 0.0
    clip_grad: float | None = 1.0
    quant_lr_scale: float = 1.0  # lr of the quantizers' step sizes and offsets, as a multiple of ``lr``
    weight_quant_lr_scale: float | None = None  # the weight quantizers' step sizes (None: quant_lr_scale; 0: fixed)
    seed: int = 0
    # quantization-aware training
    quant: dict[str, Any] | None = None
    calib_batches: int = 4
    teacher: dict[str, Any] = field(default_factory=lambda: {"source": "none"})
    regularizer: dict[str, Any] | None = None  # {"lambda_max": 0.01, "start_frac": 0.25}
    oscillation: dict[str, Any] | None = None  # {"every": 1, "freeze_threshold": null}
    # bookkeeping
    out: str = "runs/run"
    log_every: int = 20
    eval_every: int = 1
    ckpt_every_steps: int = 0
    device: str = "auto"
    progress: bool = True
    max_steps: int | None = None  # stop early (tests); the schedule still spans ``epochs``

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of settings")
        return cls.from_dict(_apply_overrides(data, overrides or []))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        data = copy.deepcopy(data)
        for f in fields(cls):  # YAML reads "1e-3" as a string: coerce numbers, and say so when it fails
            value = data.get(f.name)
            if isinstance(value, str) and f.type in ("float", "int", "float | None", "int | None"):
                try:
                    data[f.name] = float(value) if "float" in f.type else int(value)
                except ValueError:
                    raise ConfigError(f"setting {f.name!r} must be a number; got {value!r}") from None
        cfg = cls(**data)
        cfg.crop_scale, cfg.betas = tuple(cfg.crop_scale), tuple(cfg.betas)
        return cfg.validate()

    def apply(self, overrides: list[str]) -> TrainConfig:
        """A copy with ``key=value`` overrides applied (see ``_apply_overrides``)."""
        return TrainConfig.from_dict(_apply_overrides(self.to_dict(), overrides))

    def validate(self) -> TrainConfig:
        if self.batch_size % self.num_crops:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of num_crops ({self.num_crops})")
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
        if source == "live" and not self.teacher.get("checkpoint"):
            raise ConfigError("teacher.source=live needs teacher.checkpoint")
        if source == "file" and not self.teacher.get("softlabels"):
            raise ConfigError("teacher.source=file needs teacher.softlabels (made by `vvtq softlabels`)")
        self.quant_config()  # a bad quantization setting raises QuantizerError with a clear message
        self._check_mappings()
        return self

    def _check_mappings(self) -> None:
        """Every key of ``teacher``, ``regularizer`` and ``oscillation`` is one its consumer takes, and its values
        are accepted: a typo fails here, before any data is read, not after calibration."""
        from ..analysis.oscillation import OscillationTracker
        from ..regularize import ModelBinRegularizer

        for name, known in sub_mapping_keys().items():
            mapping = getattr(self, name)
            if mapping is None or name == "quant":  # quant: checked by QuantConfig.preset
                continue
            if not isinstance(mapping, dict):
                raise ConfigError(f"setting {name!r} must be a mapping (or null); got {mapping!r}")
            unknown = set(mapping) - set(known)
            if unknown:
                raise ConfigError(f"unknown key(s) in {name}: {', '.join(sorted(unknown))}; known: "
                                  f"{', '.join(known)}")
        try:
            if self.regularizer is not None:
                ModelBinRegularizer([], 1, **self.regularizer)
            if self.oscillation is not None:
                OscillationTracker([], **{k: v for k, v in self.oscillation.items() if k != "dtype"})
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


def sub_mapping_keys() -> dict[str, tuple[str, ...]]:
    """The keys each mapping-valued setting takes, read from the code that consumes them."""
    from ..analysis.oscillation import OscillationTracker
    from ..quant import QuantConfig
    from ..regularize import ModelBinRegularizer

    return {"quant": ("preset", "overrides_file", *(f.name for f in fields(QuantConfig))),
            "teacher": ("source", "checkpoint", "softlabels", "hard_weight"),
            "regularizer": _params(ModelBinRegularizer, skip=2),
            "oscillation": _params(OscillationTracker, skip=1)}


def settings_help() -> str:
    """Every setting of a recipe, with the keys of the mapping-valued ones (for ``vvtq train --help``)."""
    subs = sub_mapping_keys()
    return ", ".join(f"{f.name}.{{{', '.join(subs[f.name])}}}" if f.name in subs else f.name
                     for f in fields(TrainConfig))


def _params(cls: type, skip: int) -> tuple[str, ...]:
    """The keyword parameters of ``cls.__init__`` after ``self`` and the first ``skip`` positional ones."""
    return tuple(list(inspect.signature(cls.__init__).parameters)[1 + skip:])


def _apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a recipe mapping (values parsed as YAML; ``a.b=v`` sets a key inside a
    mapping)."""
    data = copy.deepcopy(data)
    names = {f.name for f in fields(TrainConfig)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        parts = key.strip().split(".")
        if parts[0] not in names:
            raise ConfigError(f"override {item!r}: unknown setting {parts[0]!r}")
        target = data
        for part in parts[:-1]:
            if target.get(part) is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            target = target[part]
        target[parts[-1]] = value
    return data
