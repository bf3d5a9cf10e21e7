"""Integer reference runtime: runs a packed export (``vvtq.export.format``) with no training code or state.

The structure comes from ``timm.create_model`` (the architecture recorded in the header; a Hugging Face model's
from the class and config its ``model_kwargs["hf"]`` records: ``vvtq.hf.build_hf``); every quantized
layer and every attention block is then replaced by the runtime's own modules, fed from the file. The walk is the
QAT conversion's: the rule table ``vvtq.quant.rules``, with this module's factory (``_FileFactory``); attention
is ``vvtq.quant.attention.AttentionCore``, the arithmetic the quantized model evaluates with.

- activation codes, exactly as the training quantizer: ``c = clamp(round((x - beta) / s), Qn, Qp)`` (round half
  to even), per tensor / channel / head group;
- a quantized linear (or the patch-embedding convolution) accumulates integer products of the codes, then scales
  (``vvtq.quant.intmath``; input groups g of constant scale along the contraction axis):

      y_o = s_w,out[o] * ( sum_g s_x[g] s_w,in[g] * A[o, g]  +  sum_g beta[g] s_w,in[g] * S[o, g] ) + b_o
      A[o, g] = sum_{i in g} c_x[i] * c_w[o, i]        (integer accumulation)
      S[o, g] = sum_{i in g} c_w[o, i]                 (integer column sums: the offset folded out)

- attention: ``logits = alpha[h] * s_q[h] s_k[h] * (C_q @ C_k^T) + bias``; softmax in float;
  ``out = s_p[h] s_v[h] * (C_p @ C_v)`` (with the softmax-output quantizer off: ``softmax @ (s_v C_v)``);
  ``alpha`` is ``1/sqrt(d)``, or SwinV2's learned logit scale on L2-normalised q and k;
- LayerNorm, softmax, GELU / SiLU, residual adds, pooling, position embeddings (absolute, relative, SwinV2's bias
  MLP, EVA-02's RoPE) in float.

Arithmetic: float32 by default (``dtype``). The integer accumulations are exact: in float32 when every partial sum
is provably below 2^24, else in float64 (below 2^53 for any 8-bit layer) and rounded once; see ``intmath``.
The quantized model evaluates through the same ``intmath`` functions (``QuantLinear`` & co. in eval mode), so the
runtime's float32 logits equal the model's bit for bit. ``float64_reference(model)`` is an independent check of
the formulas: the ordinary fake-quant model (``x_hat @ W_hat^T``) in float64, which the runtime with
``dtype=torch.float64`` matches to ~1e-12.
"""
from __future__ import annotations

import copy
import math
import types
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from ..quant.attention import AttentionCore, AttentionSpec
from ..quant.intmath import QT, QWeight, int_conv2d, int_linear, quantize
from ..quant.modules import set_integer_eval
from ..quant.quantizers import QuantizerError
from ..quant.rules import Site, apply_rules
from .format import ExportFormatError, PackedFile, read_packed
from .packing import code_range


# --------------------------------------------------------------------------- quantized tensors
class ActQuant(nn.Module):
    """An activation quantizer read from the file: ``x -> QT(clamp(round((x - beta)/s), Qn, Qp))``."""

    def __init__(self, info: dict[str, Any]):
        super().__init__()
        self.qmin, self.qmax = code_range(int(info["bits"]), bool(info["signed"]))
        self.axis, self.groups = int(info["axis"]), int(info["num_groups"])
        self.register_buffer("scale", torch.ones(self.groups))
        if info.get("offset"):
            self.register_buffer("offset", torch.zeros(self.groups))
        else:
            self.offset = None

    def forward(self, x: Tensor | QT) -> QT:
        if isinstance(x, QT):
            raise ExportFormatError("an activation is quantized twice; the file's quantizer layout is invalid")
        try:
            return quantize(x, self.scale, self.offset, self.axis, self.groups, self.qmin, self.qmax)
        except ValueError as exc:
            raise ExportFormatError(str(exc)) from None


class WeightScale(nn.Module):
    """Holds a weight quantizer's step sizes (buffer ``scale``, named as in the file)."""

    def __init__(self, groups: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(groups))


def _quant_or_none(pf: PackedFile, name: str) -> ActQuant | None:
    q = pf.header["quantizers"].get(name)
    return None if q is None else ActQuant(q)


# --------------------------------------------------------------------------- integer layers
class IntLinear(nn.Module):
    """``y = Q(x) W_hat^T + b`` on integer codes (see the module docstring for the formula)."""

    def __init__(self, pf: PackedFile, path: str):
        super().__init__()
        info = pf.header["layers"].get(path)
        if info is None or info.get("type") not in ("linear", "conv2d"):
            raise ExportFormatError(f"{pf.path}: the file has no quantized layer {path!r} the architecture needs")
        self.path, self.info = path, info
        shape = [int(d) for d in info["weight_shape"]]
        self.out_features, self.in_features = shape[0], math.prod(shape[1:])
        self.input_quant = _quant_or_none(pf, f"{path}.input_quant")
        q = pf.header["quantizers"].get(f"{path}.weight_quant")
        if q is not None:
            self.weight_quant = WeightScale(int(q["num_groups"]))
            self.w_axis, self.w_groups = int(q["axis"]), int(q["num_groups"])
            if self.w_axis not in (0, 1) or shape[self.w_axis] % self.w_groups:
                raise ExportFormatError(f"{pf.path}: unsupported weight grouping of {path!r}")
            self.w_bound = max(-x for x in code_range(int(q["bits"]), True))
            self.register_buffer("weight_codes", pf.codes(path).to(torch.float64), persistent=False)
            self.weight = None
        else:
            self.weight_quant = None
            self.weight = nn.Parameter(torch.zeros(shape), requires_grad=False)
        if info.get("bias"):
            self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False)
        else:
            self.bias = None

    def qweight(self) -> QWeight | Tensor:
        """The weight as codes and scales (or the float weight of an unquantized layer)."""
        if self.weight_quant is None:
            return self.weight
        return QWeight(self.weight_codes, self.weight_quant.scale, self.w_axis, self.w_groups, self.w_bound)

    def forward(self, x: Tensor | QT) -> Tensor:
        if not isinstance(x, QT) and self.input_quant is not None:
            x = self.input_quant(x)
        return int_linear(x, self.qweight(), self.bias)


class IntConv2d(IntLinear):
    """The patch-embedding convolution on integer codes (``vvtq.quant.intmath.int_conv2d``)."""

    def __init__(self, pf: PackedFile, path: str):
        super().__init__(pf, path)
        i = self.info
        if i["type"] != "conv2d":
            raise ExportFormatError(f"{pf.path}: layer {path!r} is not a convolution")
        self.stride, self.padding = tuple(i["stride"]), tuple(i["padding"])
        self.dilation, self.groups = tuple(i["dilation"]), int(i["groups"])

    def forward(self, x: Tensor | QT) -> Tensor:
        if not isinstance(x, QT) and self.input_quant is not None:
            x = self.input_quant(x)
        return int_conv2d(x, self.qweight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class IntAttention(AttentionCore):
    """Multi-head attention on integer codes: ``AttentionCore``'s arithmetic (shared with the QAT model), with
    the activation scales and the projections read from the file; the float parts (norms, position tables,
    SwinV2's logit scale) come from the architecture's rule and are loaded with the other FP tensors."""

    def __init__(self, pf: PackedFile, path: str, spec: AttentionSpec):
        layers, quantizers = pf.header["layers"], pf.header["quantizers"]

        def act(name: str) -> ActQuant | None:
            full = f"{path}.{name}"
            return ActQuant(quantizers[full]) if full in quantizers else None

        keys = ("q", "k", "v") if f"{path}.q" in layers else ("qkv",)
        qv_bias = None
        if keys == ("qkv",) and f"{path}.q_bias" in pf.tensors:  # a bias-free fused qkv with q / v biases
            d = spec.num_heads * spec.head_dim
            qv_bias = tuple(nn.Parameter(torch.zeros(d), requires_grad=False) for _ in range(2))
        qkv = {key: IntLinear(pf, f"{path}.{key}") for key in keys}
        super().__init__(spec, input_quant=act("input_quant"), qkv=qkv,
                         q_quant=act("q_quant"), k_quant=act("k_quant"), v_quant=act("v_quant"),
                         attn_quant=act("attn_quant"), proj=IntLinear(pf, f"{path}.proj"), qv_bias=qv_bias)

    def _integer_now(self, x: Tensor) -> bool:
        return True

    def _codes(self, quant: ActQuant | None, x: Tensor) -> Tensor | QT:
        return x if quant is None else quant(x)


class IntMlpLayer(IntLinear):
    """``fc1`` / ``fc2`` / patch merging / classifier: an ``IntLinear`` (alias for readability)."""


# --------------------------------------------------------------------------- building
def _check_arch(pf: PackedFile) -> tuple[str, dict[str, Any]]:
    arch = pf.header["arch"]
    name, kwargs = arch.get("model"), arch.get("model_kwargs") or {}
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise ExportFormatError(f"{pf.path}: header 'arch' has no model name / kwargs")
    return name, kwargs


def _create(name: str, kwargs: dict[str, Any], path: str) -> nn.Module:
    from .. import models  # noqa: F401  (registers mini_deit / mini_swin)

    try:
        if "hf" in kwargs:
            from ..hf import build_hf

            return build_hf(name, kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise ExportFormatError(f"{path}: cannot build architecture {name!r} ({exc})") from None


def build_runtime(pf: PackedFile | str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The integer inference model of a packed export (eval mode; float arithmetic in ``dtype``, float32 or
    float64). Input: normalised images."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the runtime computes in float32 or float64, not {dtype}")
    if not isinstance(pf, PackedFile):
        pf = read_packed(pf)
    name, kwargs = _check_arch(pf)
    # size the architecture on the meta device first: a header must not make us allocate more than the file holds
    with torch.device("meta"):
        probe = _create(name, kwargs, pf.path)
    need = sum(p.numel() for p in probe.parameters())
    packed = pf.header["packed"]
    have = sum(packed[n]["numel"] if n in packed else t.numel() for n, t in pf.tensors.items())
    if need > have:
        raise ExportFormatError(f"{pf.path}: the declared architecture needs {need:,} parameters but the file "
                                f"holds data for {have:,}")
    del probe
    model = _create(name, kwargs, pf.path)
    _replace(model, pf)
    used = {n for n in pf.header["layers"]}
    placed = {n for n, m in model.named_modules() if isinstance(m, IntLinear)}
    if used != placed:
        raise ExportFormatError(f"{pf.path}: quantized layers in the file and the architecture differ: "
                                f"{sorted(used ^ placed)[:4]}")
    model = model.to(dtype).eval()
    state = {n: t for n, t in pf.tensors.items() if n not in packed}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())[:300]
        raise ExportFormatError(f"{pf.path}: the tensors do not fit the architecture ({msg})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    model.vvtq_packed_header = pf.header
    return model


class _FileFactory:
    """The runtime's factory for the rule table (``vvtq.quant.rules``): layers and attention read from the file."""

    def __init__(self, pf: PackedFile):
        self.pf = pf

    def layer(self, module: nn.Module, path: str, site: Site) -> nn.Module:
        if path not in self.pf.header["layers"]:
            return module
        return IntConv2d(self.pf, path) if site.conv else IntMlpLayer(self.pf, path)

    def attention(self, spec: AttentionSpec, path: str) -> nn.Module:
        return IntAttention(self.pf, path, spec)


def _replace(model: nn.Module, pf: PackedFile) -> None:
    try:
        apply_rules(model, _FileFactory(pf))
    except QuantizerError as exc:
        raise ExportFormatError(f"{pf.path}: {exc}") from None


@torch.no_grad()
def run_packed(model: nn.Module, x: Tensor) -> Tensor:
    """Logits of the runtime model (in its dtype) for a batch of normalised images."""
    return model(x.to(next(model.parameters()).dtype))


# --------------------------------------------------------------------------- evaluation
def evaluate_packed(path: str | Path, data: str | None = None, data_root: str | None = None,
                    split: str | None = None, limit: int | None = None, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of a packed export run by the integer runtime (``vvtq eval --packed``)."""
    from torch.utils.data import DataLoader

    from ..data import EvalDataset, SubsetImageDataset
    from ..data.splits import eval_split

    pf = read_packed(path)
    model = build_runtime(pf)
    arch, ds_info = pf.header["arch"], pf.header.get("data") or {}
    data = data or ds_info.get("name")
    if not data:
        raise ExportFormatError(f"{path}: the file records no dataset; pass --data")
    recorded = data == ds_info.get("name")  # another dataset than the recorded one takes no recorded root
    base = eval_split(data, split or ds_info.get("split") or "test",
                      data_root or (ds_info.get("root") if recorded else None), int(ds_info.get("holdout") or 0))
    if limit:
        base = SubsetImageDataset(base, range(min(limit, len(base))))
    loader = DataLoader(EvalDataset(base, int(arch["img_size"]), arch.get("mean"), arch.get("std")),
                        batch_size=batch_size, shuffle=False)
    correct = total = 0
    for x, y in loader:
        correct += int((run_packed(model, x).argmax(1) == y).sum())
        total += y.numel()
    return 100.0 * correct / max(total, 1)


# --------------------------------------------------------------------------- float64 fake-quant reference
def _fq64_weight(self, w: Tensor) -> Tensor:
    from ..quant import quant_codes

    if not self.enabled:
        return w
    s = self.expanded_scale(w)
    codes = quant_codes(w.float(), s.float(), self.qmin, self.qmax)  # exactly the training codes
    return codes.to(w.dtype) * s


def _fq64_act(self, x: Tensor) -> Tensor:
    if not self.enabled:
        return x
    s, b = self.expanded_scale(x), self.expanded_offset(x)
    v = x if b is None else x - b
    out = torch.clamp(torch.round(v / s), self.qmin, self.qmax) * s
    return out if b is None else out + b


def float64_reference(model: nn.Module) -> nn.Module:
    """A float64 copy of a fake-quantized model on the plain fake-quant path (``x_hat @ W_hat^T``, not the integer
    domain): same quantizers, activation codes computed in float64 (weights: the training codes). An independent
    check of the runtime's integer formulas (``build_runtime(..., dtype=torch.float64)``)."""
    from ..quant import Quantizer

    ref = set_integer_eval(copy.deepcopy(model).double().eval(), False)
    for m in ref.modules():
        if isinstance(m, Quantizer):
            m.forward = types.MethodType(_fq64_weight if m.is_weight else _fq64_act, m)
    return ref
