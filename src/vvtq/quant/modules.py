"""Quantized layers: linear, convolution and multi-head attention composed from ``Quantizer`` modules.

The layers only decide *where* quantizers sit (docs/METHOD.md §3); the rounding lives in the quantizers.
``QuantAttention`` replaces a timm attention block (the rules in ``vvtq.quant.rules``: ViT/DeiT, Swin, SwinV2,
EVA-02) with split or fused q/k/v projections and activation quantizers on the block input, q, k, v (per head),
the softmax output (unsigned, per head) and attn@v (per head, as the input quantizer of the output projection);
its arithmetic is ``vvtq.quant.attention.AttentionCore``, shared with the export runtime.

Training runs the fake-quantized tensors through ordinary float layers. Evaluation (eval mode, no autograd, no
autocast) computes the same maths in the integer domain (``vvtq.quant.intmath``): matmuls on the codes, exact,
then scaled. That is the export runtime's code, so the accuracy measured here is the deployed model's, bit for bit.
``set_integer_eval(model, False)`` keeps evaluation on the fake-quant path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionCore, attention_bias  # noqa: F401  (attention_bias: re-exported)
from .intmath import QT, int_conv2d, int_linear
from .quantizers import Quantizer


def _run(quant: Quantizer | None, x: Tensor) -> Tensor:
    return x if quant is None else quant(x)


def _codes(quant: Quantizer | None, x: Tensor | QT) -> Tensor | QT:
    return x if quant is None or isinstance(x, QT) else quant.quantize(x)


class _IntegerEval:
    """Mixin: whether a layer evaluates in the integer domain now (see the module docstring)."""

    integer_eval = True

    def _integer_now(self, x: Tensor, *quants: Quantizer | None) -> bool:
        if not self.integer_eval or self.training or torch.is_grad_enabled():
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        return all(q is None or (isinstance(q, Quantizer) and q.integer_ready()) for q in quants)


def set_integer_eval(model: nn.Module, enabled: bool) -> nn.Module:
    """Evaluate ``model``'s quantized layers in the integer domain (default) or on the fake-quant path."""
    for m in model.modules():
        if isinstance(m, _IntegerEval):
            m.integer_eval = bool(enabled)
    return model


class QuantLinear(_IntegerEval, nn.Linear):
    """``y = Q_in(x) @ Q_w(W)^T + b``. Shares the source layer's weight and bias parameters. Takes a ``QT`` (codes)
    from an attention block in integer evaluation."""

    def __init__(self, linear: nn.Linear, weight_quant: Quantizer, input_quant: Quantizer | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quant = weight_quant
        self.input_quant = input_quant

    def forward(self, x: Tensor | QT) -> Tensor:
        if isinstance(x, QT) or self._integer_now(x, self.input_quant, self.weight_quant):
            return int_linear(_codes(self.input_quant, x), self.weight_quant.quantize_weight(self.weight), self.bias)
        return F.linear(_run(self.input_quant, x), self.weight_quant(self.weight), self.bias)


class QuantConv2d(_IntegerEval, nn.Conv2d):
    """A ``Conv2d`` with quantized input and weight (the patch embedding). Shares the source's parameters."""

    def __init__(self, conv: nn.Conv2d, weight_quant: Quantizer, input_quant: Quantizer | None = None):
        nn.Module.__init__(self)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(conv, attr))
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_quant = weight_quant
        self.input_quant = input_quant

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode == "zeros" and self._integer_now(x, self.input_quant, self.weight_quant):
            return int_conv2d(_codes(self.input_quant, x), self.weight_quant.quantize_weight(self.weight), self.bias,
                              self.stride, self.padding, self.dilation, self.groups)
        return self._conv_forward(_run(self.input_quant, x), self.weight_quant(self.weight), self.bias)


class QuantAttention(_IntegerEval, AttentionCore):
    """Multi-head self-attention with module-dependent quantization (VVTQ, Huang et al. 2023, §3.2).

    Built by ``vvtq.quant.convert`` from a timm attention module (the rule in ``vvtq.quant.rules``); ``q``/``k``/
    ``v`` are separate ``QuantLinear`` layers when ``split`` (else one fused ``qkv``). The arithmetic is
    ``AttentionCore``'s, shared with the export runtime. With the softmax-output quantizer off, training runs the
    attention fused (``scaled_dot_product_attention``); with it on, the softmax is explicit so that its output
    can be quantized.
    """

    def _integer_now(self, x: Tensor, *quants: Quantizer | None) -> bool:
        quants = quants or (self.input_quant, self.q_quant, self.k_quant, self.v_quant, self.attn_quant)
        return _IntegerEval._integer_now(self, x, *quants)

    def _codes(self, quant: Quantizer | None, x: Tensor) -> Tensor | QT:
        return _codes(quant, x)

    def _fake(self, quant: Quantizer | None, x: Tensor) -> Tensor:
        return _run(quant, x)

    def _project(self, x: Tensor | QT, B: int, N: int) -> tuple[Tensor, Tensor, Tensor]:
        if not (self.split and self._one_matmul(x)):
            return AttentionCore._project(self, x, B, N)
        # the same maths as three layers, in one matmul over the stacked quantized weights
        layers = (self.q, self.k, self.v)
        w = torch.cat([layer.weight_quant(layer.weight) for layer in layers])
        b = None
        if any(layer.bias is not None for layer in layers):  # a missing bias (SwinV2's, EVA's key) is zero
            b = torch.cat([w.new_zeros(layer.out_features) if layer.bias is None else layer.bias for layer in layers])
        qkv = F.linear(x, w, b)
        return qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _one_matmul(self, x: Tensor | QT) -> bool:
        """Whether split q/k/v may run as one matmul: on the fake-quant path, when none of the three layers has
        its own input quantizer or a hook that must see its call."""
        if isinstance(x, QT):
            return False
        return not any(layer.input_quant is not None or layer._forward_hooks or layer._forward_pre_hooks
                       for layer in (self.q, self.k, self.v))
