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
is patchified and run the same way. LayerNorm, softmax, GELU and residuals stay float. Attention is
``vvtq.quant.attention.AttentionCore`` (``FastAttention``): the quantized model's order of operations, with these
kernels. The model is walked by the rule table (``vvtq.quant.rules``) with this module's factory (``FastFactory``).

Not bit-exact: folding ``1/s`` into a projection's float epilogue, and onnxruntime's own rounding of
``x / s``, move values within float32 rounding of a code threshold into the neighbouring code. The exact QDQ export
(``vvtq.export.onnx``, ``--onnx-mode qdq``) keeps the runtime's arithmetic. uint8 x int8 matmuls are exact on CPUs
with AVX512-VNNI / AVX-VNNI (32-bit accumulation); older x86 kernels (``vpmaddubsw``) may saturate 16-bit pair sums
for the 8-bit layers.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..quant.attention import AttentionCore, AttentionSpec, attend
from ..quant.modules import QuantConv2d, QuantLinear
from ..quant.rules import Site, export_copy
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
class FastCodes(nn.Module):
    """``clamp(round(x / scale) + zp, lo, hi)``: codes of values already in code units (``scale`` 1, the step size
    folded into the layer before), or of the softmax output (its step sizes, per tensor or per head on axis 1)."""

    def __init__(self, scale: Tensor, zp: Tensor, hi: int, lo: int = 0):
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zp", zp)
        self.hi, self.lo = hi, lo

    def forward(self, x: Tensor) -> Tensor:
        return quantize_linear(x, self.scale, self.zp, self.hi, self.lo)


class FastAct(nn.Module):
    """An activation quantizer as uint8 codes with zero point ``-Qn``: ``codes(x)`` (``forward``) from real values;
    ``unit_codes()`` (uint8) and ``unit_int8()`` make the quantizer of values already in code units (``u = x / s``)."""

    def __init__(self, q: nn.Module, where: str):
        super().__init__()
        self.groups, self.axis = int(q.num_groups), int(q.axis)
        self.qmin, self.qmax = int(q.qmin), int(q.qmax)
        if self.qmax - self.qmin > 255:
            raise FastExportError(f"{where}: {self.qmax - self.qmin + 1} activation codes do not fit uint8")
        self.register_buffer("scale", q.scale.detach().float().clamp_min(1e-8).clone())
        self.register_buffer("offset", None if q.offset is None else q.offset.detach().float().clone())
        self.register_buffer("zp", torch.tensor(-self.qmin, dtype=torch.uint8))

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

    forward = codes

    def unit_codes(self) -> FastCodes:
        return FastCodes(torch.ones(()), self.zp.clone(), self.qmax - self.qmin)

    def unit_int8(self) -> FastCodes:
        return FastCodes(torch.ones(()), torch.zeros((), dtype=torch.int8), self.qmax, self.qmin)


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
        """From real values, or from codes (an integer tensor: an attention block hands its projections those)."""
        return self.from_codes(self.input_quant.codes(x) if x.is_floating_point() else x)


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


class FastAttention(AttentionCore):
    """Multi-head attention on codes (the module docstring), ``[B, N, C] -> [B, N, C]``: ``AttentionCore.forward``
    (projections, heads, q / k / v codes, bias and mask, heads merged, output projection) and ``attend`` (scores,
    bias, softmax, its codes, attn@v), with every quantizer as codes and both matmuls as ``MatMulIntegerToFloat``.
    The step sizes of q, k and v are folded into their projections, whose outputs are quantized in code units."""

    def __init__(self, spec: AttentionSpec, where: str):
        H, d = spec.num_heads, spec.head_dim
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(spec, name), nn.Identity):
                raise FastExportError(f"{where}.{name}: a norm inside attention has no fast form")
        for name, what in (("rope_prefix", "rotary position embedding (EVA-02)"),
                           ("qv_bias", "separate q / v biases"), ("logit_scale", "cosine attention (SwinV2)")):
            if getattr(spec, name) is not None:
                raise FastExportError(f"{where}: {what} has no fast form")
        quants = {n: spec.quantizers[n] for n in ("q_quant", "k_quant", "v_quant", "attn_quant")}
        quants["out"] = spec.proj.input_quant
        for n, q in quants.items():
            if q is None or not q.enabled or q.offset is not None or q.num_groups not in (1, H):
                raise FastExportError(f"{where}.{n}: the fast export needs a per-tensor or per-head quantizer "
                                      "without offset")
        for n in ("k_quant", "v_quant"):
            if quants[n].qmin < -128 or quants[n].qmax > 127:
                raise FastExportError(f"{where}.{n}: codes do not fit int8")
        q_act, k_act, v_act, out_act = (FastAct(quants[n], f"{where}.{n}")
                                        for n in ("q_quant", "k_quant", "v_quant", "out"))
        p_act = FastAct(quants["attn_quant"], f"{where}.attn_quant")
        C = H * d
        inv = [1.0 / a.per_channel(C).double().expand(C) for a in (q_act, k_act, v_act)]
        iq = spec.quantizers["input_quant"]
        if "q" in spec.linears:
            qkv = {n: FastLinear(spec.linears[n], f"{where}.{n}", m, iq) for n, m in zip("qkv", inv, strict=True)}
        else:
            qkv = {"qkv": FastLinear(spec.linears["qkv"], f"{where}.qkv", torch.cat(inv), iq)}
        p_scale = p_act.scale.reshape(()) if p_act.groups == 1 else p_act.scale
        super().__init__(spec, input_quant=FastAct(iq, f"{where}.input_quant"), qkv=qkv, q_quant=None,
                         k_quant=None, v_quant=None, proj=FastLinear(spec.proj, f"{where}.proj"),
                         attn_quant=FastCodes(p_scale, torch.zeros(p_scale.shape, dtype=torch.uint8), p_act.qmax))
        self.qkv_codes = nn.ModuleList([q_act.unit_codes(), k_act.unit_int8(), v_act.unit_int8()])  # see _project
        self.out_quant = out_act.unit_codes()  # attn@v as the output projection's input codes
        head = lambda v: v.reshape(()) if v.numel() == 1 else v.view(1, -1, 1, 1)  # noqa: E731
        per_head = lambda a: a.scale.double().expand(H)  # noqa: E731
        alpha = self.scale * per_head(q_act) * per_head(k_act)
        gamma = per_head(p_act) * per_head(v_act) / per_head(out_act)
        uniform = all(a.groups == 1 for a in (q_act, k_act, v_act, p_act, out_act))
        self.register_buffer("alpha", head(alpha[:1] if uniform else alpha).float())
        self.register_buffer("gamma", head(gamma[:1] if uniform else gamma).float())
        self.register_buffer("s8_zero", torch.zeros((), dtype=torch.int8))
        self.register_buffer("u8_zero", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("one", torch.ones(()))

    def _integer_now(self, x: Tensor) -> bool:
        return True

    def _codes(self, quant: nn.Module | None, x: Tensor) -> Tensor:
        return x if quant is None else quant(x)

    def _project(self, x: Tensor, B: int, N: int) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v codes per head: the projections yield code units (step sizes folded in), quantized on [B, N, C]
        before the heads are split, so the core's q / k / v quantizers stay empty (the same values: the norms and
        RoPE in between have no fast form). Quantized after a float Reshape / Transpose, they would make
        onnxruntime's optimiser move those across the QuantizeLinear with an inserted DequantizeLinear: float work."""
        if self.split:
            units = [layer(x) for layer in (self.q, self.k, self.v)]
        else:
            units = self.qkv(x).split(self.attn_dim, dim=-1)
        return tuple(self._heads(codes(u), B, N) for codes, u in zip(self.qkv_codes, units, strict=True))

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, integer: bool) -> Tensor:
        """``attend`` on the codes of q, k, v: ``alpha[h] (C_q - z) @ C_k^T`` and ``gamma[h] C_p @ C_v`` (a factor
        common to all heads inside the kernel, a per-head one after it); returns the output projection's codes."""
        one, per_head = self.one, self.alpha.ndim > 0

        def scores(cq: Tensor, ckt: Tensor) -> Tensor:
            y = matmul_int(cq, ckt, one if per_head else self.alpha, one, self.qkv_codes[0].zp, self.s8_zero)
            return y * self.alpha if per_head else y

        def mix(cp: Tensor, cv: Tensor) -> Tensor:
            y = matmul_int(cp, cv, one if per_head else self.gamma, one, self.u8_zero, self.s8_zero)
            return y * self.gamma if per_head else y

        return self.out_quant(attend(q, k, v, bias, scores, self.attn_quant, mix))


def _refusing(kind: type[nn.Module], src: nn.Module | AttentionSpec, path: str) -> nn.Module:
    try:
        return kind(src, path)
    except FastExportError as exc:
        raise FastExportError(f"{exc}; the exact export (mode qdq, --onnx-mode qdq) covers it") from None


class FastFactory:
    """The fast export's factory for the rule table (``vvtq.quant.rules``): a quantized model's layers and attention
    blocks on integer kernels (a layer left unquantized stays as it is); what has no fast form is refused."""

    def layer(self, module: nn.Module, path: str, site: Site) -> nn.Module:
        if not isinstance(module, (QuantLinear, QuantConv2d)):
            return module
        return _refusing(FastPatchEmbed if site.conv else FastLinear, module, path)

    def attention(self, spec: AttentionSpec, path: str) -> nn.Module:
        return _refusing(FastAttention, spec, path)


def fast_ready(model: nn.Module) -> nn.Module:
    """A float32 eval-mode copy of a quantized ``model`` whose quantized layers run on integer kernels in ONNX
    (and compute the same maths in PyTorch otherwise)."""
    return export_copy(model, FastFactory())
