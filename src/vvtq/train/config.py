"""``TrainConfig``: a training recipe, read from a YAML file (a path, or the name of a recipe shipped in
``vvtq/recipes``) with command-line overrides."""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..qat import LEVERS, LeverSettings, TeacherSettings
from ..settings import Settings, coerce

__all__ = ["ConfigError", "QuantSettings", "TrainConfig", "settings_help", "sub_mapping_keys"]


@dataclass
class QuantSettings(Settings):
    """Recipe setting ``quant``: a ``QuantConfig`` preset (``lsq`` or ``vvtq``) and the fields it changes (unset
    fields keep the preset's), plus ``overrides_file`` (a mixed-precision file from ``vvtq analyze
    --bit-budget``). See ``vvtq.quant.QuantConfig`` for each field."""

    preset: str = "vvtq"
    overrides_file: str | None = None
    wbits: int = 4
    abits: int | None = None
    edge_bits: int | None = None
    split_qkv: bool | None = None
    weight_granularity: dict[str, str] | None = None
    act_granularity: dict[str, str] | None = None
    gelu_offset: bool | None = None
    gelu_signed: bool | None = None
    grad_scale: str | None = None
    act_init: str | None = None
    overrides: dict[str, dict[str, int]] | None = None

    def validate(self) -> None:
        from ..quant import QuantizerError

        try:
            self.quant_config()
        except QuantizerError as exc:
            raise ConfigError(f"quant: {exc}") from None

    def quant_config(self):
        """The ``QuantConfig`` these settings ask for."""
        from ..quant import QuantConfig

        changes = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.init and f.name not in ("preset", "overrides_file", "wbits", "abits")
                   and getattr(self, f.name) is not None}
        cfg = QuantConfig.preset(self.preset, self.wbits, self.abits, **changes)
        return cfg.with_overrides_file(self.overrides_file) if self.overrides_file else cfg


@dataclass
class TrainConfig:
    """Every knob of one training run. FP training is ``quant: null``; QAT sets ``quant`` (``QuantSettings``).

    ``teacher`` (``vvtq.qat.TeacherSettings``) says what the student learns from. The QAT levers registered in
    ``vvtq.qat`` (``regularizer``, ``anneal``, ``oscillation``, ...) are settings of the recipe too: each is null
    (off) or a mapping read as its typed settings class, and held in ``levers``; ``cfg.regularizer`` reads it.
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
    crop_translate: float = 0.0  # then shift each crop by up to this fraction of the side (outside: reflected)
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
    channels_last: bool = False  # NHWC memory layout (the CIFAR-10 CNN's step: 1.27x on the CPU here)
    amp: str = "auto"  # bf16 autocast: auto (CUDA only), bf16 (any device: the CNN 1.8x on AVX512-BF16), fp32
    # quantization-aware training
    quant: QuantSettings | None = None
    calib_batches: int = 4
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    levers: dict[str, LeverSettings] = field(default_factory=dict)  # recipe keys: the names in vvtq.qat.LEVERS
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
        names = setting_names()
        unknown = set(data) - set(names)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        data = copy.deepcopy(data)
        levers = {name: value for name in LEVERS if (value := data.pop(name, None)) is not None}
        if data.get("teacher") is None:
            data.pop("teacher", None)
        for f in fields(cls):  # the sub-settings are read in __post_init__
            if f.name in data and f.name not in ("teacher", "quant"):
                if f.name == "model_kwargs" and not isinstance(data[f.name], dict):
                    raise ConfigError(f"setting 'model_kwargs' must be a mapping; got {data[f.name]!r}")
                data[f.name] = coerce(f.name, f.type, data[f.name])
        cfg = cls(**data, levers=levers)
        cfg.crop_scale, cfg.betas = tuple(cfg.crop_scale), tuple(cfg.betas)
        return cfg.validate()

    def __post_init__(self) -> None:
        """The sub-settings, given as plain mappings (a recipe, ``TrainConfig(quant={"preset": "lsq"})``) or as
        settings objects, read as their typed classes and checked."""
        if self.quant is not None:
            self.quant = QuantSettings.from_mapping("quant", self.quant)
        self.teacher = TeacherSettings.from_mapping("teacher", self.teacher)
        unknown = sorted(set(self.levers) - set(LEVERS))
        if unknown:
            raise ConfigError(f"unknown lever(s): {', '.join(unknown)}; known: {', '.join(LEVERS)}")
        self.levers = {k: LEVERS[k].from_mapping(k, v) for k, v in self.levers.items() if v is not None}

    def __setattr__(self, name: str, value: Any) -> None:
        """``cfg.regularizer = {...}`` (or None) sets the lever's settings in ``levers``, checked as in a recipe."""
        if name in LEVERS:
            levers = {k: v for k, v in self.__dict__.get("levers", {}).items() if k != name}
            if value is not None:
                levers[name] = LEVERS[name].from_mapping(name, value)
            object.__setattr__(self, "levers", levers)
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        """A lever's settings by its recipe name (``cfg.regularizer``), or None when the recipe leaves it off."""
        if name in LEVERS:
            return self.__dict__.get("levers", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def apply(self, overrides: list[str]) -> TrainConfig:
        """A copy with ``key=value`` overrides applied (see ``_apply_overrides``)."""
        return TrainConfig.from_dict(_apply_overrides(self.to_dict(), overrides))

    def validate(self) -> TrainConfig:
        """Check the settings that depend on each other (each sub-setting checked itself when read), without
        reading any data; return ``self`` or raise one ``ConfigError``."""
        if self.num_crops < 1 or self.batch_size < 1:
            raise ConfigError(f"num_crops and batch_size must be >= 1; got {self.num_crops}, {self.batch_size}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale must be [lo, hi] with 0 < lo <= hi <= 1; got {list(self.crop_scale)}")
        if not 0.0 <= self.crop_translate < 1.0:
            raise ConfigError(f"crop_translate must be in [0, 1) (a fraction of the image side); got "
                              f"{self.crop_translate}")
        if not 0.0 <= self.single_crop_frac < 1.0:
            raise ConfigError(f"single_crop_frac must be in [0, 1); got {self.single_crop_frac}")
        if self.single_crop_frac and self.num_crops == 1:
            raise ConfigError("single_crop_frac is a final phase of one crop an image after several: it needs "
                              "num_crops > 1; got num_crops=1")
        if self.batch_size % self.num_crops:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of num_crops ({self.num_crops})")
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"amp must be auto, bf16 or fp32 (no autocast); got {self.amp!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be adamw or sgd; got {self.optimizer!r}")
        if self.epochs <= 0 or self.lr <= 0:
            raise ConfigError("epochs and lr must be positive")
        if self.holdout < 0:
            raise ConfigError(f"holdout must be a number of images >= 0; got {self.holdout}")
        if self.quant_lr_scale <= 0 or (self.weight_quant_lr_scale or 0) < 0:
            raise ConfigError(f"quant_lr_scale must be positive and weight_quant_lr_scale not negative; got "
                              f"{self.quant_lr_scale}, {self.weight_quant_lr_scale}")
        if self.quant is None and (qat := [n for n, s in self.levers.items() if s.qat_only]):
            raise ConfigError(f"{qat[0]} acts on quantized weights but this recipe trains in float (quant: null): "
                              f"set quant or drop {qat[0]}")
        return self

    def quant_config(self):
        """The ``QuantConfig`` this recipe asks for, or ``None`` for FP training."""
        return None if self.quant is None else self.quant.quant_config()

    def lever_settings(self) -> list[tuple[str, LeverSettings]]:
        """``(name, settings)`` of the levers this recipe turns on, in the order the loop calls them."""
        return sorted(((name, self.levers[name]) for name in LEVERS if name in self.levers), key=lambda t: t[1].order)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a plain mapping (what ``from_dict`` reads back; what checkpoints record)."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "levers":
                continue
            if isinstance(value, Settings):
                value = value.to_dict()
            data[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
            if f.name == "teacher":
                data.update({name: s.to_dict() if (s := self.levers.get(name)) else None for name in LEVERS})
        return data


def setting_names() -> list[str]:
    """Every key a recipe may set: ``TrainConfig``'s fields and the registered levers."""
    names = [f.name for f in fields(TrainConfig) if f.name != "levers"]
    if clash := sorted(set(names) & set(LEVERS)):
        raise ConfigError(f"lever(s) registered under a setting's name: {', '.join(clash)}")
    return [*names, *LEVERS]


def sub_mapping_keys() -> dict[str, tuple[str, ...]]:
    """The keys each mapping-valued setting takes, read from its settings class."""
    return {"quant": QuantSettings.keys(), "teacher": TeacherSettings.keys(),
            **{name: cls.keys() for name, cls in LEVERS.items()}}


def settings_help() -> str:
    """Every setting of a recipe, with the keys of the mapping-valued ones (for ``vvtq train --help``)."""
    subs = sub_mapping_keys()
    return ", ".join(f"{name}.{{{', '.join(subs[name])}}}" if name in subs else name for name in setting_names())


def _apply_overrides(data: dict[str, Any], overrides: list[str | tuple[str, Any]]) -> dict[str, Any]:
    """Apply overrides to a recipe mapping: ``"key=value"`` strings (values parsed as YAML) or ``(key, value)``
    pairs (values as given); ``a.b`` sets one key inside the mapping ``a``."""
    data = copy.deepcopy(data)
    names = set(setting_names())
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
