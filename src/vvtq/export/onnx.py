"""ONNX export in QDQ form (QuantizeLinear / DequantizeLinear), runnable by onnxruntime.

Every enabled quantizer of a vvtq model becomes, in the ONNX graph (opset 18):

    activation, per tensor:  y = DequantizeLinear(QuantizeLinear(Clip(x - beta, Qn*s, Qp*s), s, 0), s, 0) + beta
    activation, per head:    y = Mul(DequantizeLinear(QuantizeLinear(Clip(Div(x, s_b), Qn, Qp), 1, 0), 1, 0), s_b)
    weight:                  W_hat = DequantizeLinear(C_w, s_w, 0, axis)     (C_w: an int8 initializer, the codes)

Storage is int8 for signed codes and uint8 for unsigned ones (softmax and GELU outputs). QuantizeLinear rounds
half to even (as ``torch.round``) and saturates to the 8-bit range; the narrower ranges of 2..7-bit codes (e.g.
[-2, 1] for 2-bit signed, [0, 3] for 2-bit unsigned) are imposed by a float ``Clip`` just before QuantizeLinear:
``round(clip(x, Qn*s, Qp*s) / s) = clamp(round(x / s), Qn, Qp)`` (``Qp*s/s`` is within an ulp of Qp). An integer
Clip between QuantizeLinear and DequantizeLinear expresses the same maths, but onnxruntime's QDQ graph
transformer mis-handles that pattern (wrong results at the default optimisation level), so it is not used. The
offset beta (``Sub``/``Add`` around the pair) appears only where the model learned one (GELU output).

Per-channel weight scales use the ``axis`` attribute of DequantizeLinear with a 1-D scale as long as that axis
(per-head weight scales repeated over each head's channels). Linear weights are stored ``[in, out]`` (axis 1 for
per-output scales) so that DequantizeLinear feeds MatMul directly. Per-head activation scales (q, k, v, softmax
output ``[B, H, N, *]``; the output projection's input ``[B, N, C]``, each head's scale repeated over its d
channels) use explicit broadcasting around a unit-scale pair, the same arithmetic: onnxruntime fuses
``DequantizeLinear -> MatMul`` into ``MatMulIntegerToFloat``, which rejects per-axis zero points on its first
input. Likewise, a layer whose input is not a plain per-tensor Q/DQ pair (per-head input, GELU output with
offset) gets ``Mul(DequantizeLinear(C_w, 1, 0), s_w)``: with a float input, onnxruntime would otherwise fuse the
weight's DequantizeLinear with MatMul and quantize the float input dynamically to 8 bits.

The graph is produced by ``torch.onnx.export`` (the dynamo exporter) from a copy of the model whose quantized layers
and attention blocks are rebuilt with modules that emit these ops via ``torch.onnx.ops.symbolic`` during export
and compute the same thing in PyTorch otherwise. The copy is walked by the rule table (``vvtq.quant.rules``,
``apply_rules(..., quantized=True)``) with this module's factory (``OnnxFactory``); attention keeps the quantized
model's fake-quant arithmetic (``OnnxAttention``, an ``AttentionCore``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fileio import atomic_write
from ..quant.attention import ACT_QUANTIZERS, AttentionCore, AttentionSpec
from ..quant.modules import QuantConv2d, QuantLinear
from ..quant.rules import Site, export_copy

OPSET = 18
_ONNX_INT8, _ONNX_UINT8, _ONNX_FLOAT = 3, 2, 1


def _per_axis(p: Tensor, groups: int, axis: int, x_shape: torch.Size) -> tuple[Tensor, int]:
    """A scale/offset vector as long as ``axis`` (groups repeated over their channels), and the axis >= 0."""
    if groups == 1:
        return p.reshape(()), 0
    ax = axis % len(x_shape)
    return p.repeat_interleave(x_shape[ax] // groups), ax


def _bshape(v: Tensor, ax: int, ndim: int) -> Tensor:
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[ax] = -1
    return v.view(shape)


class OnnxActQDQ(nn.Module):
    """``x -> DQ(Clip(Q(x - beta))) + beta`` with the quantizer's scale(s), offset and code range."""

    enabled = True

    def __init__(self, q: nn.Module):
        super().__init__()
        self.qmin, self.qmax, self.signed = int(q.qmin), int(q.qmax), bool(q.signed)
        self.groups, self.axis = int(q.num_groups), int(q.axis)
        self.register_buffer("scale", q.scale.detach().float().clamp_min(1e-8).clone())
        self.register_buffer("offset", None if q.offset is None else q.offset.detach().float().clone())
        self.code_dtype = torch.int8 if self.signed else torch.uint8

    def forward(self, x: Tensor) -> Tensor:
        s, ax = _per_axis(self.scale, self.groups, self.axis, x.shape)
        b = None if self.offset is None else _per_axis(self.offset, self.groups, self.axis, x.shape)[0]
        if b is not None:
            x = x - _bshape(b, ax, x.ndim)
        if torch.onnx.is_in_onnx_export():
            from torch.onnx.ops import symbolic

            code_t = _ONNX_INT8 if self.signed else _ONNX_UINT8
            if s.ndim:  # grouped: explicit broadcast around a unit-scale Q/DQ pair (see the module docstring)
                sb, unit = _bshape(s, ax, x.ndim), torch.ones((), dtype=s.dtype)
                x, qs = x / sb, unit
            else:
                qs = s
            zp = torch.zeros((), dtype=self.code_dtype)
            lo, hi = (self.qmin, self.qmax) if s.ndim else (self.qmin * s, self.qmax * s)
            x = torch.clamp(x, lo, hi)
            c = symbolic("QuantizeLinear", (x, qs, zp), {}, dtype=code_t, shape=x.shape, version=OPSET)
            y = symbolic("DequantizeLinear", (c, qs, zp), {}, dtype=_ONNX_FLOAT, shape=x.shape, version=OPSET)
            if s.ndim:
                y = y * sb
        else:
            sb = _bshape(s, ax, x.ndim)
            y = torch.clamp(torch.round(x / sb), self.qmin, self.qmax) * sb
        return y if b is None else y + _bshape(b, ax, x.ndim)


class _Off(nn.Module):
    enabled = False

    def forward(self, x: Tensor) -> Tensor:
        return x


class OnnxWeight(nn.Module):
    """The weight ``DequantizeLinear(codes int8, s_w, 0, axis)`` of one layer. Linear weights are stored
    transposed, ``[in, out]`` with the per-output scales on axis 1, so that DequantizeLinear feeds MatMul directly
    (no Transpose between them for graph optimisers to move)."""

    def __init__(self, layer: nn.Module, transpose: bool, per_axis: bool = True):
        super().__init__()
        self.per_axis = per_axis
        q = layer.weight_quant
        groups = int(q.num_groups)
        codes = q.codes(layer.weight.detach()).to(torch.int8)
        s, ax = _per_axis(q.scale.detach().float().clamp_min(1e-8), groups, int(q.axis), codes.shape)
        if transpose:
            codes, ax = codes.t().contiguous(), (1 - ax if s.ndim else 0)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", s.clone())
        self.ax = ax

    def forward(self) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            from torch.onnx.ops import symbolic

            if self.per_axis or not self.scale.ndim:
                zp = torch.zeros_like(self.scale, dtype=torch.int8)
                return symbolic("DequantizeLinear", (self.codes, self.scale, zp), {"axis": self.ax},
                                dtype=_ONNX_FLOAT, shape=self.codes.shape, version=OPSET)
            unit, zp = torch.ones((), dtype=self.scale.dtype), torch.zeros((), dtype=torch.int8)
            w = symbolic("DequantizeLinear", (self.codes, unit, zp), {}, dtype=_ONNX_FLOAT, shape=self.codes.shape,
                         version=OPSET)
            return w * _bshape(self.scale, self.ax, self.codes.ndim)
        return self.codes.float() * _bshape(self.scale, self.ax, self.codes.ndim)


def _act(q: nn.Module | None) -> nn.Module:
    return OnnxActQDQ(q) if q is not None and q.enabled else _Off()


class OnnxLinear(nn.Module):
    """``y = QDQ(x) @ DQ(C_w^T) + b``."""

    transpose = True

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.input_quant = _act(layer.input_quant)
        # DQ(weight, per-axis) -> MatMul is fused by onnxruntime; it is exact when the other input comes from a
        # per-tensor Q/DQ pair without offset (an integer matmul), but with a float input ORT quantizes it dynamically
        # to 8 bits. Such layers get ``DQ(codes, 1) * s_w`` instead, which no optimiser fuses.
        plain = isinstance(self.input_quant, OnnxActQDQ) and self.input_quant.groups == 1 \
            and self.input_quant.offset is None
        self.wq = OnnxWeight(layer, self.transpose, plain) if layer.weight_quant.enabled else None
        w = layer.weight.detach()
        self.weight = None if self.wq is not None else nn.Parameter((w.t() if self.transpose else w).clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        w = self.wq() if self.wq is not None else self.weight
        y = self.input_quant(x) @ w
        return y if self.bias is None else y + self.bias


class OnnxConv2d(OnnxLinear):
    transpose = False

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, \
            layer.groups

    def forward(self, x: Tensor) -> Tensor:
        w = self.wq() if self.wq is not None else self.weight
        return F.conv2d(self.input_quant(x), w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class OnnxAttention(AttentionCore):
    """A quantized attention block for the QDQ export: ``AttentionCore``'s fake-quant arithmetic (the quantized
    model's, term for term), its quantizers as QDQ pairs and its projections as ``OnnxLinear``."""

    def __init__(self, spec: AttentionSpec):
        quants = {name: _act(spec.quantizers[name]) for name in ACT_QUANTIZERS}
        super().__init__(spec, qkv={key: OnnxLinear(layer) for key, layer in spec.linears.items()},
                         proj=OnnxLinear(spec.proj), qv_bias=spec.qv_bias, **quants)

    def _integer_now(self, x: Tensor) -> bool:
        return False

    def _fake(self, quant: nn.Module | None, x: Tensor) -> Tensor:
        return x if quant is None else quant(x)


class OnnxFactory:
    """The QDQ export's factory for the rule table (``vvtq.quant.rules``): a quantized model's layers and attention
    blocks as QDQ modules (a layer left unquantized stays as it is)."""

    def layer(self, module: nn.Module, path: str, site: Site) -> nn.Module:
        if not isinstance(module, (QuantLinear, QuantConv2d)):
            return module
        return OnnxConv2d(module) if site.conv else OnnxLinear(module)

    def attention(self, spec: AttentionSpec, path: str) -> nn.Module:
        return OnnxAttention(spec)


def onnx_ready(model: nn.Module) -> nn.Module:
    """A float32 eval-mode copy of a quantized ``model`` whose quantizers emit QDQ ops under ONNX export."""
    return export_copy(model, OnnxFactory())


MODES = ("fast", "qdq")


def export_onnx(model: nn.Module, path: str | Path, img_size: int, in_chans: int | None = None,
                batch: int = 2, mode: str = "qdq", metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``model`` (quantized, calibrated) as an ONNX file with a dynamic batch axis; return info.

    ``mode``: ``"qdq"`` (this module: exact, float kernels) or ``"fast"`` (``vvtq.export.onnx_fast``: integer
    kernels). ``metadata``: string properties stored in the file (``vvtq eval --onnx`` reads ``vvtq.*``)."""
    if mode not in MODES:
        raise ValueError(f"ONNX mode must be one of {MODES}; got {mode!r}")
    if in_chans is None:
        in_chans = next(mod for mod in model.modules() if isinstance(mod, nn.Conv2d)).in_channels
    if mode == "fast":
        from .onnx_fast import OPSET_FAST, fast_ready

        m, opset = fast_ready(model), OPSET_FAST
    else:
        m, opset = onnx_ready(model), OPSET
    save_onnx(m, torch.zeros(batch, in_chans, img_size, img_size), path, opset,
              {"vvtq.onnx_mode": mode, **(metadata or {})})
    path = Path(path)
    return {"path": str(path), "opset": opset, "mode": mode, "bytes": path.stat().st_size}


def save_onnx(m: nn.Module, x: Tensor, path: str | Path, opset: int, metadata: dict[str, str] | None = None) -> None:
    """``torch.onnx.export`` (dynamo) of ``m`` on ``x`` (input ``images``, output ``logits``, dynamic batch), one
    self-contained file written atomically, with ``metadata`` as the model's metadata properties."""
    import onnx

    with atomic_write(path) as tmp:
        prog = torch.onnx.export(m, (x,), dynamo=True, opset_version=opset, input_names=["images"],
                                 output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                 external_data=False, verbose=False, report=False)
        prog.save(str(tmp))
        if metadata:
            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                proto.metadata_props.add(key=key, value=str(value))
            onnx.save(proto, str(tmp))


def run_onnx(path: str | Path, x: Tensor) -> Tensor:
    """Logits from onnxruntime (CPU, one thread) for a batch of normalised images."""
    from .onnx_runtime import onnx_session, run_session

    return run_session(onnx_session(path, threads=1), x)
