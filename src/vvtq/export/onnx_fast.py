"""Fast ONNX export: every quantized matmul runs on onnxruntime's integer kernels (``--onnx-mode fast``).

Activation codes are held in uint8 with a zero point ``z = -Qn`` (signed codes shifted), weight codes in int8;
``QuantizeLinear`` rounds half to even and saturates to [0, 255], a ``Clip`` on the uint8 codes imposes the narrow
range of 2..7-bit codes:

    c_u8 = Clip(QuantizeLinear(x - beta, s, z), 0, Qp - Qn)       = clamp(round((x - beta) / s), Qn, Qp) + z

A quantized linear is one ``com.microsoft.MatMulIntegerToFloat`` per input scale group g (one, unless the input or
the weight has per-head scales along the contraction), summed; the offset beta and a folded output factor m_o go
into its bias:

    y_o = m_o * ( s_w,out[o] * sum_g s_x[g] s_w,in[g] * (c_x[g] - z) @ C_w[g, o]
                  + b_o + s_w,out[o] * sum_g beta[g] s_w,in[g] * sum_{i in g} C_w[i, o] )

Attention folds the per-head step sizes of q, k, v into the output factors of their projections (``m = 1/s``, so
the projection yields code units and the codes are ``Clip(QuantizeLinear(u, 1, z))``), and runs both attention
matmuls as ``MatMulIntegerToFloat`` on codes (q, softmax output: uint8; k, v: int8), scaled per head afterwards:

    logits = scale * s_q[h] s_k[h] * (C_q - z_q) @ C_k^T        out / s_o[h] = s_p[h] s_v[h] / s_o[h] * C_p @ C_v

The softmax output is quantized with a per-head ``QuantizeLinear`` (``axis=1``); the attention output comes out
in the code units of the output projection's input quantizer. The patch embedding (kernel = stride, no padding)
is patchified and run the same way. LayerNorm, softmax, GELU and residuals stay float.

Not bit-exact: folding ``1/s`` into a projection's float epilogue, and onnxruntime's own rounding of
``x / s``, move values within float32 rounding of a code threshold into the neighbouring code. The exact QDQ export
(``vvtq.export.onnx``, ``--onnx-mode qdq``) keeps the runtime's arithmetic. uint8 x int8 matmuls are exact on CPUs
with AVX512-VNNI / AVX-VNNI (32-bit accumulation); older x86 kernels (``vpmaddubsw``) may saturate 16-bit pair sums
for the 8-bit layers.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .format import ExportFormatError

OPSET_FAST = 21
_MS = "com.microsoft"


class FastExportError(ExportFormatError):
    """The model has a layer the fast ONNX export cannot run on integer kernels (use ``--onnx-mode qdq``)."""


# --------------------------------------------------------------------------- the operators (ONNX or PyTorch)
def _onnx(op: str, inputs: list, attrs: dict, dtype: torch.dtype, shape) -> Tensor:
    from torch.onnx.ops import symbolic

    domain = op.rpartition("::")[0]  # "com.microsoft::Op" (version 1), or a standard op at OPSET_FAST
    return symbolic(op, inputs, attrs, dtype=dtype, shape=shape, version=1 if domain else OPSET_FAST)


def _along(v: Tensor, axis: int, ndim: int) -> Tensor:
    """A per-axis vector shaped to broadcast along ``axis`` (a scalar stays a scalar)."""
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.view(shape)


def quantize_linear(x: Tensor, scale: Tensor, zp: Tensor, hi: int, lo: int = 0, axis: int = 1) -> Tensor:
    """``clamp(round(x / scale) + zp, lo, hi)`` as ``zp``'s integer dtype: ``QuantizeLinear`` (+ ``Clip``)."""
    info = torch.iinfo(zp.dtype)
    if torch.onnx.is_in_onnx_export():
        c = _onnx("QuantizeLinear", [x, scale, zp], {"axis": axis} if scale.ndim else {}, zp.dtype, x.shape)
        if lo > info.min or hi < info.max:
            c = _onnx("Clip", [c, torch.tensor(lo, dtype=zp.dtype), torch.tensor(hi, dtype=zp.dtype)], {},
                      zp.dtype, x.shape)
        return c
    s, z = _along(scale, axis, x.ndim), _along(zp, axis, x.ndim)
    return torch.clamp(torch.round(x / s) + z, max(lo, info.min), min(hi, info.max)).to(zp.dtype)


def matmul_int(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, a_zp: Tensor, b_zp: Tensor,
               bias: Tensor | None = None) -> Tensor:
    """``(a - a_zp) @ (b - b_zp) * a_scale * b_scale + bias`` (``com.microsoft.MatMulIntegerToFloat``)."""
    if torch.onnx.is_in_onnx_export():
        shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        return _onnx(f"{_MS}::MatMulIntegerToFloat", [a, b, a_scale, b_scale, a_zp, b_zp, bias], {},
                     torch.float32, shape)
    y = ((a.float() - a_zp.float()) @ (b.float() - b_zp.float())) * (a_scale * b_scale)
    return y if bias is None else y + bias


# --------------------------------------------------------------------------- activations and layers
class FastAct(nn.Module):
    """An activation quantizer as uint8 codes with zero point ``-Qn``: ``codes(x)`` from real values,
    ``unit_codes(u)`` from values already in code units (``u = x / s``)."""

    def __init__(self, q: nn.Module, where: str):
        super().__init__()
        self.groups, self.axis = int(q.num_groups), int(q.axis)
        self.qmin, self.qmax = int(q.qmin), int(q.qmax)
        if self.qmax - self.qmin > 255:
            raise FastExportError(f"{where}: {self.qmax - self.qmin + 1} activation codes do not fit uint8")
        self.register_buffer("scale", q.scale.detach().float().clamp_min(1e-8).clone())
        self.register_buffer("offset", None if q.offset is None else q.offset.detach().float().clone())
        self.register_buffer("zp", torch.tensor(-self.qmin, dtype=torch.uint8))
        self.register_buffer("unit", torch.ones(()))

    def per_channel(self, width: int) -> Tensor:
        """The step sizes repeated over ``width`` channels (a scalar for a per-tensor quantizer)."""
        return self.scale.reshape(()) if self.groups == 1 else self.scale.repeat_interleave(width // self.groups)

    def codes(self, x: Tensor) -> Tensor:
        if self.groups > 1 and self.axis % x.ndim != x.ndim - 1:
            raise FastExportError("a grouped activation quantizer off the channel axis has no fast form")
        if self.offset is not None:
            x = x - (self.offset.reshape(()) if self.groups == 1 else self.offset.repeat_interleave(
                x.shape[-1] // self.groups))
        s = self.per_channel(x.shape[-1])
        zp = self.zp if s.ndim == 0 else self.zp.expand(s.shape).contiguous()
        return quantize_linear(x, s, zp, self.qmax - self.qmin, axis=-1)

    def unit_codes(self, u: Tensor) -> Tensor:
        return quantize_linear(u, self.unit, self.zp, self.qmax - self.qmin)


class FastLinear(nn.Module):
    """A quantized linear as ``MatMulIntegerToFloat`` on codes (the module docstring's formula); ``mult``: a folded
    factor per output (1 / the next quantizer's step size)."""

    def __init__(self, layer: nn.Module, where: str, mult: Tensor | None = None, input_quant: nn.Module | None = None):
        super().__init__()
        wq, iq = layer.weight_quant, input_quant if input_quant is not None else layer.input_quant
        if not wq.enabled or iq is None or not iq.enabled:
            raise FastExportError(f"{where}: the fast export needs quantized weights and inputs")
        self.input_quant = FastAct(iq, f"{where}.input_quant")
        codes = wq.codes(layer.weight.detach()).flatten(1).double()  # conv: [O, C*k*k], the patchified order
        out, width = codes.shape
        s = wq.scale.detach().double().clamp_min(1e-8)
        groups, axis = int(wq.num_groups), int(wq.axis) % layer.weight.ndim
        if groups > 1 and axis not in (0, 1):
            raise FastExportError(f"{where}: weight scale groups along axis {axis} have no fast form")
        s_out = s.reshape(1).expand(out) if groups == 1 else (s.repeat_interleave(out // groups) if axis == 0
                                                               else torch.ones(out, dtype=torch.float64))
        w_in = s if groups > 1 and axis == 1 else torch.ones(1, dtype=torch.float64)
        x_in = self.input_quant.scale.double()
        G = math.lcm(x_in.numel() if self.input_quant.groups > 1 else 1, w_in.numel())
        if width % G:
            raise FastExportError(f"{where}: {G} scale groups do not divide {width} inputs")
        m = torch.ones(out, dtype=torch.float64) if mult is None else mult.double()
        k = width // G
        sx, sw = x_in.reshape(-1).repeat_interleave(G // x_in.numel()), w_in.repeat_interleave(G // w_in.numel())
        bias = torch.zeros(out, dtype=torch.float64) if layer.bias is None else layer.bias.detach().double()
        if self.input_quant.offset is not None:
            beta = self.input_quant.offset.double().reshape(-1).repeat_interleave(G // self.input_quant.groups)
            colsum = codes.view(out, G, k).sum(-1)  # S[o, g]
            bias = bias + s_out * (colsum @ (beta * sw))
        self.G, self.k = G, k
        codes_t = codes.t().to(torch.int8)  # [in, out]
        for g in range(G):  # one initializer per segment: constant B operands that onnxruntime pre-packs
            self.register_buffer(f"codes{g}", codes_t[g * k:(g + 1) * k].contiguous())
            self.register_buffer(f"a_scale{g}", sx[g].float())
            self.register_buffer(f"b_scale{g}", (sw[g] * s_out * m).float())
        self.register_buffer("bias", (m * bias).float())
        self.register_buffer("b_zp", torch.zeros((), dtype=torch.int8))

    def from_codes(self, c: Tensor) -> Tensor:
        """The layer's output from uint8 input codes ``[..., in]``."""
        y = None
        for g in range(self.G):
            cg = c if self.G == 1 else c[..., g * self.k:(g + 1) * self.k]
            part = matmul_int(cg, getattr(self, f"codes{g}"), getattr(self, f"a_scale{g}"),
                              getattr(self, f"b_scale{g}"), self.input_quant.zp, self.b_zp,
                              self.bias if g == 0 else None)
            y = part if y is None else y + part
        return y

    def forward(self, x: Tensor) -> Tensor:
        return self.from_codes(self.input_quant.codes(x))


class FastPatchEmbed(FastLinear):
    """A patch-embedding convolution (kernel = stride, no padding) as patchify + ``MatMulIntegerToFloat``."""

    def __init__(self, conv: nn.Module, where: str):
        p = tuple(conv.kernel_size)
        if tuple(conv.stride) != p or any(conv.padding) or conv.groups != 1 or any(d != 1 for d in conv.dilation) \
                or conv.padding_mode != "zeros":
            raise FastExportError(f"{where}: only a patchifying convolution (kernel = stride) has a fast form")
        if conv.input_quant is not None and conv.input_quant.num_groups > 1:
            raise FastExportError(f"{where}: per-channel input scales of a convolution have no fast form")
        super().__init__(conv, where)
        self.patch = p

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        (ph, pw), hp, wp = self.patch, H // self.patch[0], W // self.patch[1]
        c = self.input_quant.codes(x).reshape(B, C, hp, ph, wp, pw).permute(0, 2, 4, 1, 3, 5)
        y = self.from_codes(c.reshape(B, hp * wp, C * ph * pw))  # [B, N, O]
        return y.reshape(B, hp, wp, -1).permute(0, 3, 1, 2)  # NCHW, as the convolution


class FastAttention(nn.Module):
    """Multi-head attention on codes (the module docstring); ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, att: nn.Module, where: str):
        super().__init__()
        self.H, self.d, self.scale = att.num_heads, att.head_dim, float(att.scale)
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(att, name), nn.Identity):
                raise FastExportError(f"{where}.{name}: a norm inside attention has no fast form")
        for name, what in (("rope_prefix", "rotary position embedding (EVA-02)"),
                           ("q_bias", "separate q / v biases"), ("logit_scale", "cosine attention (SwinV2)")):
            if getattr(att, name, None) is not None:
                raise FastExportError(f"{where}: {what} has no fast form")
        quants = {n: getattr(att, n) for n in ("q_quant", "k_quant", "v_quant", "attn_quant")}
        quants["out"] = att.proj.input_quant
        for n, q in quants.items():
            if q is None or not q.enabled or q.offset is not None or q.num_groups not in (1, self.H):
                raise FastExportError(f"{where}.{n}: the fast export needs a per-tensor or per-head quantizer "
                                      "without offset")
        for n in ("k_quant", "v_quant"):
            if quants[n].qmin < -128 or quants[n].qmax > 127:
                raise FastExportError(f"{where}.{n}: codes do not fit int8")
        self.q_act, self.k_act, self.v_act, self.out_act = (FastAct(quants[n], f"{where}.{n}")
                                                            for n in ("q_quant", "k_quant", "v_quant", "out"))
        self.p_act = FastAct(quants["attn_quant"], f"{where}.attn_quant")
        C = self.H * self.d
        inv = [1.0 / a.per_channel(C).double().expand(C) for a in (self.q_act, self.k_act, self.v_act)]
        iq = att.input_quant
        if att.split:
            self.q, self.k, self.v = (FastLinear(getattr(att, n), f"{where}.{n}", m, iq)
                                      for n, m in zip("qkv", inv, strict=True))
        else:
            self.qkv = FastLinear(att.qkv, f"{where}.qkv", torch.cat(inv), iq)
        self.split = att.split
        self.proj = FastLinear(att.proj, f"{where}.proj")
        self.rel_pos = att.rel_pos
        head = lambda v: v.reshape(()) if v.numel() == 1 else v.view(1, -1, 1, 1)  # noqa: E731
        per_head = lambda a: a.scale.double().expand(self.H)  # noqa: E731
        alpha = self.scale * per_head(self.q_act) * per_head(self.k_act)
        gamma = per_head(self.p_act) * per_head(self.v_act) / per_head(self.out_act)
        uniform = all(a.groups == 1 for a in (self.q_act, self.k_act, self.v_act, self.p_act, self.out_act))
        self.register_buffer("alpha", head(alpha[:1] if uniform else alpha).float())
        self.register_buffer("gamma", head(gamma[:1] if uniform else gamma).float())
        self.register_buffer("p_scale", self.p_act.scale.reshape(()) if self.p_act.groups == 1 else self.p_act.scale)
        self.register_buffer("s8_zero", torch.zeros((), dtype=torch.int8))
        self.register_buffer("p_zp", torch.zeros(self.p_scale.shape, dtype=torch.uint8))
        self.register_buffer("u8_zero", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("one", torch.ones(()))

    def _s8(self, u: Tensor, act: FastAct) -> Tensor:
        return quantize_linear(u, self.one, self.s8_zero, act.qmax, act.qmin)

    def forward(self, x: Tensor, mask: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        from ..quant.modules import attention_bias

        B, N, C = x.shape
        H, d = self.H, self.d
        xc = self.q.input_quant.codes(x) if self.split else self.qkv.input_quant.codes(x)
        if self.split:
            uq, uk, uv = self.q.from_codes(xc), self.k.from_codes(xc), self.v.from_codes(xc)
        else:
            uq, uk, uv = self.qkv.from_codes(xc).split(C, dim=-1)
        cq = self.q_act.unit_codes(uq).reshape(B, N, H, d).transpose(1, 2)
        ck = self._s8(uk, self.k_act).reshape(B, N, H, d).permute(0, 2, 3, 1)
        cv = self._s8(uv, self.v_act).reshape(B, N, H, d).transpose(1, 2)
        one = self.one
        per_head = self.alpha.ndim > 0
        logits = matmul_int(cq, ck, one if per_head else self.alpha, one, self.q_act.zp, self.s8_zero)
        if per_head:
            logits = logits * self.alpha
        bias = attention_bias(self.rel_pos, H, N, B, mask if mask is not None else attn_mask)
        if bias is not None:
            logits = logits + bias
        cp = quantize_linear(logits.softmax(-1), self.p_scale, self.p_zp, self.p_act.qmax)
        out = matmul_int(cp, cv, one if per_head else self.gamma, one, self.u8_zero, self.s8_zero)
        if per_head:
            out = out * self.gamma
        co = self.out_act.unit_codes(out).transpose(1, 2).reshape(B, N, C)
        return self.proj.from_codes(co)


def fast_ready(model: nn.Module) -> nn.Module:
    """A float32 eval-mode copy of a quantized ``model`` whose quantized layers run on integer kernels in ONNX
    (and compute the same maths in PyTorch otherwise)."""
    from ..quant import QuantAttention, QuantConv2d, QuantLinear

    m = copy.deepcopy(model).float().eval()
    for path, mod in list(m.named_modules()):
        if not isinstance(mod, (QuantAttention, QuantConv2d, QuantLinear)):
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = m.get_submodule(parent_path) if parent_path else m
        if not isinstance(getattr(parent, attr), (QuantAttention, QuantConv2d, QuantLinear)):
            continue  # inside an attention block already replaced
        kind = FastAttention if isinstance(mod, QuantAttention) else \
            FastPatchEmbed if isinstance(mod, QuantConv2d) else FastLinear
        try:
            setattr(parent, attr, kind(mod, path))
        except FastExportError as exc:
            raise FastExportError(f"{exc}; the exact export (mode qdq, --onnx-mode qdq) covers it") from None
    for p in m.parameters():
        p.requires_grad_(False)
    return m

