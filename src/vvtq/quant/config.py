"""``QuantConfig``: one object that says how every site of a model is quantized.

Sites are named by *kind* (a weight: ``q``, ``k``, ``v``, ``qkv``, ``proj``, ``fc1``, ``fc2``, ``patch_embed``,
``merge``, ``head``; an activation: ``attn_in``, ``q_act``, ``k_act``, ``v_act``, ``attn_prob``, ``attn_out``,
``mlp_in``, ``mlp_hidden``, ``patch_embed_in``, ``merge_in``, ``head_in``) and by their module path in the
converted model (e.g. ``blocks.3.attn.q.weight_quant``). Overrides match the path, or the owning module's path,
with shell-style patterns, so mixed precision is one entry away: ``{"blocks.0.*": {"wbits": 8, "abits": 8}}``.
"""
from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .quantizers import GRAD_SCALE_MODES, GRANULARITIES, INIT_METHODS, QuantizerError, check_bits

WEIGHT_KINDS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2", "patch_embed", "merge", "head")
ACT_KINDS = ("attn_in", "q_act", "k_act", "v_act", "attn_prob", "attn_out", "mlp_in", "mlp_hidden",
             "patch_embed_in", "merge_in", "head_in")
EDGE_KINDS = ("patch_embed", "merge", "head", "patch_embed_in", "merge_in", "head_in")
# granularities each activation kind accepts (heads only make sense inside attention)
_ACT_ALLOWED = {k: ("tensor", "head") for k in ("q_act", "k_act", "v_act", "attn_prob", "attn_out")}
_WEIGHT_HEADLESS = ("fc1", "fc2", "patch_embed", "merge", "head")
_OVERRIDE_KEYS = ("wbits", "abits")
PRESETS = ("lsq", "vvtq")


def _weights(default: str, **kinds: str) -> dict[str, str]:
    return {k: kinds.get(k, default) for k in WEIGHT_KINDS}


def _acts(default: str, **kinds: str) -> dict[str, str]:
    return {k: kinds.get(k, default) for k in ACT_KINDS}


@dataclass
class QuantConfig:
    """How to quantize a ViT / DeiT / Swin model (docs/METHOD.md §3).

    Attributes:
        wbits, abits: weight and activation bit-widths of the transformer blocks (2..8, or 32 for off).
        edge_bits: bits of the patch embedding, Swin patch merging and classifier, weights and inputs.
        split_qkv: split the fused qkv projection into q, k and v with their own weight quantizers.
        weight_granularity: per weight kind, ``tensor``, ``channel`` (output rows) or ``head``.
        act_granularity: per activation kind, ``tensor``, ``channel`` (last axis) or ``head``.
        gelu_offset: quantize the GELU output with a learned offset ``beta`` (the output is then unsigned).
        gelu_signed: quantize the GELU output signed (only without an offset). The default, unsigned, is LSQ's
            standard choice for a non-negative activation; signed 2 bits leave a single positive level.
        grad_scale: step-size gradient scaling, ``lsq``, ``reference`` or ``none``.
        act_init: activation scale initialisation, ``mse`` or ``lsq``.
        overrides: ``{pattern: {"wbits": b, "abits": b}}``, applied in order (later entries win).
    """

    wbits: int = 4
    abits: int = 4
    edge_bits: int = 8
    split_qkv: bool = True
    weight_granularity: dict[str, str] = field(default_factory=lambda: _weights("channel"))
    act_granularity: dict[str, str] = field(default_factory=lambda: _acts(
        "tensor", q_act="head", k_act="head", v_act="head", attn_prob="head", attn_out="head"))
    gelu_offset: bool = True
    gelu_signed: bool = False
    grad_scale: str = "lsq"
    act_init: str = "mse"
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, wbits: int = 4, abits: int | None = None, **changes: Any) -> QuantConfig:
        """``"lsq"``: the plain LSQ baseline (fused qkv, per-tensor scales, unsigned GELU output, no offset).
        ``"vvtq"``: module-dependent (split q/k/v, per-channel weights, per-head attention activations,
        unsigned GELU output with offset). Both keep the ends at 8 bits. ``changes`` set fields; a granularity
        table in them changes only the kinds it names, the others keep the preset's."""
        abits = wbits if abits is None else abits
        if name == "lsq":
            cfg = cls(wbits=wbits, abits=abits, split_qkv=False, weight_granularity=_weights("tensor"),
                      act_granularity=_acts("tensor"), gelu_offset=False)
        elif name == "vvtq":
            cfg = cls(wbits=wbits, abits=abits)
        else:
            raise QuantizerError(f"unknown preset {name!r}; choose one of {PRESETS}")
        for key, value in changes.items():
            if key not in {f.name for f in fields(cls)}:
                raise QuantizerError(f"QuantConfig has no field {key!r}")
            if key in ("weight_granularity", "act_granularity") and isinstance(value, dict):
                value = {**getattr(cfg, key), **value}  # a partial table changes only the kinds it names
            setattr(cfg, key, value)
        return cfg.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> QuantConfig:
        """Raise ``QuantizerError`` with a clear message if anything is out of range; return ``self``."""
        check_bits(self.wbits, "wbits")
        check_bits(self.abits, "abits")
        check_bits(self.edge_bits, "edge_bits")
        if self.gelu_signed and self.gelu_offset:
            raise QuantizerError("gelu_signed and gelu_offset exclude each other: an offset GELU output is unsigned")
        if self.grad_scale not in GRAD_SCALE_MODES:
            raise QuantizerError(f"grad_scale must be one of {GRAD_SCALE_MODES}; got {self.grad_scale!r}")
        if self.act_init not in INIT_METHODS:
            raise QuantizerError(f"act_init must be one of {INIT_METHODS}; got {self.act_init!r}")
        for table, kinds in ((self.weight_granularity, WEIGHT_KINDS), (self.act_granularity, ACT_KINDS)):
            for kind, gran in table.items():
                if kind not in kinds:
                    raise QuantizerError(f"unknown module kind {kind!r}; known kinds: {', '.join(kinds)}")
                if gran not in GRANULARITIES:
                    raise QuantizerError(f"granularity of {kind!r} must be one of {GRANULARITIES}; got {gran!r}")
        for kind in _WEIGHT_HEADLESS:
            if self.weight_granularity.get(kind) == "head":
                raise QuantizerError(f"weights of {kind!r} have no attention heads; use 'tensor' or 'channel'")
        for kind, gran in self.act_granularity.items():
            if gran not in _ACT_ALLOWED.get(kind, ("tensor", "channel")):
                raise QuantizerError(f"activation {kind!r} cannot be quantized per {gran!r}")
        for pattern, spec in self.overrides.items():
            if not isinstance(spec, dict) or not spec or set(spec) - set(_OVERRIDE_KEYS):
                raise QuantizerError(f"override {pattern!r} must set 'wbits' and/or 'abits'; got {spec!r}")
            for key, bits in spec.items():
                check_bits(bits, f"{key} of override {pattern!r}")
        return self

    # ------------------------------------------------------------------ resolution
    def bits_for(self, name: str, kind: str, is_weight: bool) -> int:
        """The bit-width of the site ``name`` (a quantizer's module path) of the given kind."""
        if kind in EDGE_KINDS:
            bits = self.edge_bits
        else:
            bits = self.wbits if is_weight else self.abits
        owner = name.rsplit(".", 1)[0]
        key = "wbits" if is_weight else "abits"
        for pattern, spec in self.overrides.items():
            if key in spec and (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(owner, pattern)):
                bits = spec[key]
        return bits

    def granularity_for(self, kind: str, is_weight: bool) -> str:
        table = self.weight_granularity if is_weight else self.act_granularity
        return table.get(kind, "tensor")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise QuantizerError(f"unknown QuantConfig field(s): {', '.join(sorted(unknown))}")
        data = copy.deepcopy(data)
        # configs recorded before ``gelu_signed`` existed quantized the GELU output signed exactly when it had no
        # offset: rebuild them as they were trained
        data.setdefault("gelu_signed", not data.get("gelu_offset", True))
        cfg = cls(**data)
        # tables given partially keep the defaults for the kinds they do not name
        base = cls()
        cfg.weight_granularity = {**base.weight_granularity, **cfg.weight_granularity}
        cfg.act_granularity = {**base.act_granularity, **cfg.act_granularity}
        return cfg.validate()

    def with_overrides_file(self, path: str | Path) -> QuantConfig:
        """A copy with the overrides of a JSON/YAML file (``{"overrides": {pattern: {...}}}``) appended."""
        path = Path(path)
        if not path.is_file():
            raise QuantizerError(f"override file not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("overrides"), dict):
            raise QuantizerError(f"{path}: expected a mapping with an 'overrides' table")
        cfg = copy.deepcopy(self)
        cfg.overrides = {**cfg.overrides, **data["overrides"]}
        return cfg.validate()
