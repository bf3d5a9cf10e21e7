"""Quantized layers: linear, convolution and multi-head attention composed from ``Quantizer`` modules.

The layers only decide *where* quantizers sit (docs/METHOD.md §3); the rounding lives in the quantizers.
``QuantAttention`` replaces timm's ``Attention`` (ViT/DeiT) and ``WindowAttention`` (Swin) with split or fused
q/k/v projections and activation quantizers on the block input, q, k, v (per head), the softmax output
(unsigned, per head) and attn@v (per head, as the input quantizer of the output projection).

Training runs the fake-quantized tensors through ordinary float layers. Evaluation (eval mode, no autograd, no
autocast) computes the same maths in the integer domain (``vvtq.quant.intmath``): matmuls on the codes, exact,
then scaled. That is the export runtime's code, so the accuracy measured here is the deployed model's, bit for bit.
``set_integer_eval(model, False)`` keeps evaluation on the fake-quant path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .intmath import QT, int_attention, int_conv2d, int_linear
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


def attention_bias(rel_pos: nn.Module | None, num_heads: int, N: int, B: int, mask: Tensor | None,
                   dtype: torch.dtype = torch.float) -> Tensor | None:
    """Additive attention bias [B or 1, H, N, N]: Swin's relative positions (``rel_pos`` is the source
    ``WindowAttention``) plus its shifted-window mask [num_windows, N, N]; or a ViT mask (bool masks become
    0 / -inf)."""
    bias = None
    if rel_pos is not None:
        bias = rel_pos._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            mask = mask.view(1, num_win, 1, N, N).expand(B // num_win, -1, num_heads, -1, -1)
            bias = bias + mask.reshape(-1, num_heads, N, N)
    elif mask is not None:
        bias = mask if mask.dtype != torch.bool else torch.zeros_like(mask, dtype=dtype).masked_fill(
            ~mask, float("-inf"))
    return bias


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


class QuantAttention(_IntegerEval, nn.Module):
    """Multi-head self-attention with module-dependent quantization (VVTQ, Huang et al. 2023, §3.2).

    Built by ``vvtq.quant.convert`` from a timm attention module; ``q``/``k``/``v`` are separate
    ``QuantLinear`` layers when ``split`` (else one fused ``qkv``). With the softmax-output quantizer off, the
    attention runs fused (``scaled_dot_product_attention``); with it on, the softmax is explicit so that its
    output can be quantized.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, *, input_quant: Quantizer,
                 qkv: dict[str, QuantLinear], q_quant: Quantizer, k_quant: Quantizer, v_quant: Quantizer,
                 attn_quant: Quantizer, proj: QuantLinear, q_norm: nn.Module, k_norm: nn.Module,
                 norm: nn.Module, attn_drop: nn.Dropout, proj_drop: nn.Dropout,
                 rel_pos: nn.Module | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.attn_dim = num_heads * head_dim
        self.input_quant = input_quant
        for key, layer in qkv.items():  # "qkv", or "q", "k", "v"
            setattr(self, key, layer)
        self.split = "q" in qkv
        self.q_norm, self.k_norm = q_norm, k_norm
        self.q_quant, self.k_quant, self.v_quant, self.attn_quant = q_quant, k_quant, v_quant, attn_quant
        self.attn_drop = attn_drop
        self.norm = norm
        self.proj = proj
        self.proj_drop = proj_drop
        # Swin: the relative position bias table stays in the source WindowAttention module (kept as a child so
        # that its parameter keeps a meaningful name); ``rel_pos._get_rel_pos_bias()`` gives [1, H, N, N].
        self.rel_pos = rel_pos

    def _project(self, x: Tensor | QT, B: int, N: int) -> tuple[Tensor, Tensor, Tensor]:
        if self.split and not self._one_matmul(x):
            return tuple(layer(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                         for layer in (self.q, self.k, self.v))
        if self.split:  # the same maths as three layers, in one matmul over the stacked quantized weights
            layers = (self.q, self.k, self.v)
            w = torch.cat([layer.weight_quant(layer.weight) for layer in layers])
            b = None if self.q.bias is None else torch.cat([layer.bias for layer in layers])
            qkv = F.linear(x, w, b)
        else:
            qkv = self.qkv(x)
        return qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _one_matmul(self, x: Tensor | QT) -> bool:
        """Whether split q/k/v may run as one matmul: on the fake-quant path, when none of the three layers has
        its own input quantizer or a hook that must see its call, and their biases are all present or all not."""
        if isinstance(x, QT):
            return False
        layers = (self.q, self.k, self.v)
        if any(layer.input_quant is not None or layer._forward_hooks or layer._forward_pre_hooks
               for layer in layers):
            return False
        return len({layer.bias is None for layer in layers}) == 1

    def _bias(self, N: int, B: int, mask: Tensor | None) -> Tensor | None:
        return attention_bias(self.rel_pos, self.num_heads, N, B, mask)

    def forward(self, x: Tensor, mask: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        if is_causal:
            raise NotImplementedError("vvtq's quantized attention does not support causal masks")
        B, N, _ = x.shape
        bias = self._bias(N, B, mask if mask is not None else attn_mask)
        if self._integer_now(x, self.input_quant, self.q_quant, self.k_quant, self.v_quant, self.attn_quant):
            q, k, v = self._project(self.input_quant.quantize(x), B, N)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = self.q_quant.quantize(q), self.k_quant.quantize(k), self.v_quant.quantize(v)
            x = int_attention(q, k, v, self.scale, bias, self.attn_quant.quantize)
            x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
            return self.proj_drop(self.proj(x))
        x = self.input_quant(x)
        q, k, v = self._project(x, B, N)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        if not self.attn_quant.enabled:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_quant(attn.softmax(dim=-1))
            x = self.attn_drop(attn) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))
