"""Integer reference runtime: runs a packed export (``vvtq.export.format``) with no training code or state.

The structure comes from ``timm.create_model`` (the architecture recorded in the header); every quantized
layer and every attention block is then replaced by the runtime's own modules, fed from the file:

- activation codes, exactly as the training quantizer: ``c = clamp(round((x - beta) / s), Qn, Qp)`` (round half
  to even), per tensor / channel / head group;
- a quantized linear (or the patch-embedding convolution), with input groups g of constant scale along the
  contraction axis:

      y_o = s_w,out[o] * ( sum_g s_x[g] s_w,in[g] * A[o, g]  +  sum_g beta[g] s_w,in[g] * S[o, g] ) + b_o
      A[o, g] = sum_{i in g} c_x[i] * c_w[o, i]        (integer accumulation)
      S[o, g] = sum_{i in g} c_w[o, i]                 (integer column sums: the offset folded out)

- attention: ``logits = scale * s_q[h] s_k[h] * (C_q @ C_k^T) + bias``; softmax in float; with the softmax-output
  quantizer on, ``out = s_p[h] s_v[h] * (C_p @ C_v)``, else ``out = softmax @ (s_v C_v)`` (the fused
  ``scaled_dot_product_attention`` path of training);
- LayerNorm, softmax, GELU, residual adds, pooling, position embeddings in float.

Arithmetic: every tensor is float64. The integer accumulations are exact in float64, since every partial sum is
an integer below ``K * 255 * 128 < 2^53`` (codes are at most 8 bits, K the contraction length), whatever the
summation order; the scales are float32 values widened exactly. Groups of one element (per-input-channel
activation scales, used by no preset) fall back to ``(s_x * c_x) @ c_w^T``.

Exactness against training: the codes of a layer's input equal the training quantizer's codes whenever the
layer input agrees, and the only disagreement between the runtime's and PyTorch's values is float rounding of
the accumulations (~1e-16 relative in float64, ~1e-7 in float32). A code differs only when a value falls within
that distance of a rounding tie. ``float64_reference(model)`` gives the fake-quantized PyTorch model evaluated
in float64 (weight codes as training computes them in float32; activation codes in float64), against which the
runtime agrees to ~1e-12; against the float32 model, rare code flips at near-ties give small logit differences.
"""
from __future__ import annotations

import copy
import math
import types
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.modules import attention_bias
from .format import ExportFormatError, PackedFile, read_packed
from .packing import code_range

_MAX_GROUP_SPLIT = 16  # above this many scale groups along the contraction, use the (exact-ish) float form
_CLASSIFIER_PATHS = ("head", "head_dist", "head.fc")


# --------------------------------------------------------------------------- quantized tensors
def _expand(p: Tensor, axis: int, groups: int, x: Tensor) -> Tensor:
    """Per-group values ``p`` (G,) broadcastable to ``x``: group g covers a contiguous block along ``axis``."""
    if groups == 1:
        return p.reshape(())
    ax = axis % x.ndim
    width = x.shape[ax]
    if width % groups:
        raise ExportFormatError(f"{groups} scale groups do not divide axis {axis} of shape {tuple(x.shape)}")
    shape = [1] * x.ndim
    shape[ax] = width
    return p.repeat_interleave(width // groups).view(shape)


class QT:
    """A quantized tensor ``scale * codes + offset``: integer-valued float64 codes and per-group scale/offset
    (``(G,)``, groups along ``axis``)."""

    def __init__(self, codes: Tensor, scale: Tensor, offset: Tensor | None, axis: int, groups: int):
        self.codes, self.scale, self.offset, self.axis, self.groups = codes, scale, offset, axis, groups

    def s(self) -> Tensor:
        return _expand(self.scale, self.axis, self.groups, self.codes)

    def b(self) -> Tensor | None:
        return None if self.offset is None else _expand(self.offset, self.axis, self.groups, self.codes)

    def value(self) -> Tensor:
        out = self.codes * self.s()
        b = self.b()
        return out if b is None else out + b

    def map(self, fn) -> QT:
        """Apply a shape op (reshape/transpose) to the codes, keeping groups on a tracked axis (heads: axis 1)."""
        return QT(fn(self.codes), self.scale, self.offset, self.axis, self.groups)


def _value(x: Tensor | QT) -> Tensor:
    return x.value() if isinstance(x, QT) else x


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
        s = _expand(self.scale, self.axis, self.groups, x)
        v = x if self.offset is None else x - _expand(self.offset, self.axis, self.groups, x)
        codes = torch.clamp(torch.round(v / s), self.qmin, self.qmax)
        return QT(codes, self.scale, self.offset, self.axis % x.ndim, self.groups)


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
            self.register_buffer("weight_codes", pf.codes(path).to(torch.float64), persistent=False)
            self.weight = None
        else:
            self.weight_quant = None
            self.weight = nn.Parameter(torch.zeros(shape), requires_grad=False)
        if info.get("bias"):
            self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False)
        else:
            self.bias = None

    # the weight's scales split into an output-side (O,) and an input-side (G_w,) factor
    def _w_scales(self) -> tuple[Tensor, Tensor]:
        s = self.weight_quant.scale
        one = torch.ones(1, dtype=s.dtype)
        if self.w_groups == 1:
            return s.reshape(1).expand(self.out_features), one
        if self.w_axis == 0:
            return s.repeat_interleave(self.out_features // self.w_groups), one
        return torch.ones(self.out_features, dtype=s.dtype), s

    def weight_value(self) -> Tensor:
        if self.weight_quant is None:
            return self.weight
        s_out, s_in = self._w_scales()
        w = self.weight_codes * s_out.view(-1, *[1] * (self.weight_codes.ndim - 1))
        if s_in.numel() > 1:
            w = w * s_in.repeat_interleave(self.weight_codes.shape[1] // s_in.numel()).view(
                1, -1, *[1] * (self.weight_codes.ndim - 2))
        return w

    def _float(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_value(), self.bias)

    def forward(self, x: Tensor | QT) -> Tensor:
        if not isinstance(x, QT) and self.input_quant is not None:
            x = self.input_quant(x)
        if not isinstance(x, QT) or self.weight_quant is None or (x.groups > 1 and x.axis != x.codes.ndim - 1):
            return self._float(_value(x))
        K = self.in_features
        s_out, s_in = self._w_scales()
        gx, gw = x.groups, s_in.numel()
        G = gx * gw // math.gcd(gx, gw)
        if G > _MAX_GROUP_SPLIT:  # per-channel input scales: no integer block left to accumulate
            return self._float(_value(x))
        sx = x.scale.repeat_interleave(G // gx)
        sw = s_in.repeat_interleave(G // gw)
        W = self.weight_codes
        if G == 1:
            y = (x.codes @ W.t()) * (sx * sw)
        else:
            acc = torch.einsum("...gk,ogk->...og", x.codes.unflatten(-1, (G, K // G)), W.view(-1, G, K // G))
            y = (acc * (sx * sw)).sum(-1)
        if x.offset is not None:
            colsum = W.view(-1, G, K // G).sum(-1)  # S[o, g]
            y = y + colsum @ (x.offset.repeat_interleave(G // gx) * sw)
        y = y * s_out
        return y if self.bias is None else y + self.bias


class IntConv2d(IntLinear):
    """The patch-embedding convolution on integer codes: per input-channel group g,
    ``y = s_w[o] * (sum_g s_x[g] conv(C_x[g], C_w[:, g]) + sum_g beta[g] S[o, g]) + b``."""

    def __init__(self, pf: PackedFile, path: str):
        super().__init__(pf, path)
        i = self.info
        if i["type"] != "conv2d":
            raise ExportFormatError(f"{pf.path}: layer {path!r} is not a convolution")
        self.stride, self.padding = tuple(i["stride"]), tuple(i["padding"])
        self.dilation, self.groups = tuple(i["dilation"]), int(i["groups"])

    def _conv(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor | QT) -> Tensor:
        if not isinstance(x, QT) and self.input_quant is not None:
            x = self.input_quant(x)
        plain = (not isinstance(x, QT) or self.weight_quant is None or self.groups != 1 or self.w_axis != 0
                 or (x.groups > 1 and x.axis != 1) or x.groups > _MAX_GROUP_SPLIT
                 or (x.offset is not None and any(self.padding)))
        if plain:
            return self._conv(_value(x), self.weight_value(), self.bias)
        s_out, _ = self._w_scales()
        W, G = self.weight_codes, x.groups
        cw = W.shape[1] // G
        y = 0.0
        for g in range(G):
            sl = slice(g * cw, (g + 1) * cw)
            y = y + self._conv(x.codes[:, sl], W[:, sl]) * x.scale[g]
            if x.offset is not None:
                y = y + (W[:, sl].sum(dim=(1, 2, 3)) * x.offset[g]).view(1, -1, 1, 1)
        y = y * s_out.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def qmatmul(a: Tensor | QT, b: Tensor | QT) -> Tensor:
    """``a @ b`` for quantized operands whose groups lie off the contraction axes (heads, axis 1):
    ``s_a s_b (C_a @ C_b) + s_a beta_b rowsum(C_a) + beta_a s_b colsum(C_b) + K beta_a beta_b``."""
    if not (isinstance(a, QT) and isinstance(b, QT)):
        return _value(a) @ _value(b)
    if (a.groups > 1 and a.axis == a.codes.ndim - 1) or (b.groups > 1 and b.axis == b.codes.ndim - 2):
        return a.value() @ b.value()  # groups along the contraction: no common scale to factor out
    sa, sb = a.s(), b.s()
    out = (a.codes @ b.codes) * (sa * sb)
    ba, bb = a.b(), b.b()
    if bb is not None:
        out = out + sa * a.codes.sum(-1, keepdim=True) * bb
    if ba is not None:
        out = out + ba * sb * b.codes.sum(-2, keepdim=True)
    if ba is not None and bb is not None:
        out = out + a.codes.shape[-1] * ba * bb
    return out


class IntAttention(nn.Module):
    """Multi-head attention on integer codes (ViT/DeiT ``Attention``, Swin ``WindowAttention``)."""

    def __init__(self, pf: PackedFile, path: str, src: nn.Module):
        super().__init__()
        layers = pf.header["layers"]
        self.num_heads = int(src.num_heads)
        self.split = f"{path}.q" in layers
        qkv_out = src.qkv.out_features
        self.head_dim = qkv_out // (3 * self.num_heads)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = float(src.scale)
        quantizers = pf.header["quantizers"]

        def act(name: str) -> ActQuant | None:
            full = f"{path}.{name}"
            return ActQuant(quantizers[full]) if full in quantizers else None

        self.input_quant = act("input_quant")
        for key in (("q", "k", "v") if self.split else ("qkv",)):
            setattr(self, key, IntLinear(pf, f"{path}.{key}"))
        self.q_quant, self.k_quant, self.v_quant = act("q_quant"), act("k_quant"), act("v_quant")
        self.attn_quant = act("attn_quant")
        self.q_norm = getattr(src, "q_norm", nn.Identity())
        self.k_norm = getattr(src, "k_norm", nn.Identity())
        self.norm = getattr(src, "norm", nn.Identity())
        self.proj = IntLinear(pf, f"{path}.proj")
        self.rel_pos = None
        if hasattr(src, "relative_position_bias_table"):
            for child in ("qkv", "proj", "attn_drop", "proj_drop", "softmax", "q_norm", "k_norm", "norm"):
                if hasattr(src, child):
                    delattr(src, child)
            self.rel_pos = src

    def _heads(self, t: Tensor, B: int, N: int) -> Tensor:
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _bias(self, N: int, B: int, mask: Tensor | None) -> Tensor | None:
        return attention_bias(self.rel_pos, self.num_heads, N, B, mask, dtype=torch.float64)

    @staticmethod
    def _run(q: ActQuant | None, t: Tensor) -> Tensor | QT:
        return t if q is None else q(t)

    def forward(self, x: Tensor, mask: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        if is_causal:
            raise NotImplementedError("the vvtq runtime does not support causal masks")
        B, N, _ = x.shape
        xq = self._run(self.input_quant, x)
        if self.split:
            q, k, v = (self._heads(layer(xq), B, N) for layer in (self.q, self.k, self.v))
        else:
            q, k, v = self.qkv(xq).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self._run(self.q_quant, q), self._run(self.k_quant, k), self._run(self.v_quant, v)
        kt = k.map(lambda c: c.transpose(-2, -1)) if isinstance(k, QT) else k.transpose(-2, -1)
        logits = qmatmul(q, kt) * self.scale
        bias = self._bias(N, B, mask if mask is not None else attn_mask)
        if bias is not None:
            logits = logits + bias
        p = logits.softmax(dim=-1)
        out = qmatmul(self.attn_quant(p), v) if self.attn_quant is not None else p @ _value(v)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj(out)


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
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise ExportFormatError(f"{path}: cannot build architecture {name!r} ({exc})") from None


def build_runtime(pf: PackedFile | str | Path) -> nn.Module:
    """The integer inference model of a packed export (float64, eval mode). Input: normalised images."""
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
    model = model.double().eval()
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


def _replace(model: nn.Module, pf: PackedFile) -> None:
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.swin_transformer import PatchMerging, WindowAttention

    layers = pf.header["layers"]

    def visit(module: nn.Module, prefix: str) -> None:
        for cname, child in list(module.named_children()):
            path = prefix + cname
            if isinstance(child, (Attention, WindowAttention)):
                setattr(module, cname, IntAttention(pf, path, child))
            elif isinstance(child, Mlp) and f"{path}.fc1" in layers:
                child.fc1 = IntMlpLayer(pf, f"{path}.fc1")
                child.fc2 = IntMlpLayer(pf, f"{path}.fc2")
            elif isinstance(child, PatchEmbed) and f"{path}.proj" in layers:
                child.proj = IntConv2d(pf, f"{path}.proj")
            elif isinstance(child, PatchMerging) and f"{path}.reduction" in layers:
                child.reduction = IntMlpLayer(pf, f"{path}.reduction")
            else:
                visit(child, path + ".")

    visit(model, "")
    for path in _CLASSIFIER_PATHS:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(getattr(parent, attr, None), nn.Linear) and path in layers:
            setattr(parent, attr, IntMlpLayer(pf, path))


@torch.no_grad()
def run_packed(model: nn.Module, x: Tensor) -> Tensor:
    """Logits (float64) of the runtime model for a batch of normalised images."""
    return model(x.to(torch.float64))


# --------------------------------------------------------------------------- evaluation
def evaluate_packed(path: str | Path, data: str | None = None, data_root: str | None = None,
                    split: str | None = None, limit: int | None = None, batch_size: int = 250) -> float:
    """Top-1 accuracy (%) of a packed export run by the integer runtime (``vvtq eval --packed``)."""
    from torch.utils.data import DataLoader

    from ..data import EvalDataset, SubsetImageDataset, build_dataset

    pf = read_packed(path)
    model = build_runtime(pf)
    arch, ds_info = pf.header["arch"], pf.header.get("data") or {}
    data = data or ds_info.get("name")
    if not data:
        raise ExportFormatError(f"{path}: the file records no dataset; pass --data")
    base = build_dataset(data, split or ds_info.get("split") or "test", data_root or ds_info.get("root"))
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
    """A float64 copy of a fake-quantized model: same quantizers and formulas, activation codes computed in
    float64 (weights: the training codes). The comparison target for the runtime's exactness."""
    from ..quant import Quantizer

    ref = copy.deepcopy(model).double().eval()
    for m in ref.modules():
        if isinstance(m, Quantizer):
            m.forward = types.MethodType(_fq64_weight if m.is_weight else _fq64_act, m)
    return ref
