"""The one surgery pass: ``quantize_model(model, config)`` converts a timm ViT / DeiT / Swin / SwinV2 / EVA-02
model in place, driven by the rule table (``vvtq.quant.rules``, read by the export runtime as well).

This module is the QAT factory of that table (docs/METHOD.md §3):
- an attention block -> ``QuantAttention``: q, k, v split losslessly into three projections (``split_qkv``) or
  kept fused, activation quantizers on the block input, q, k, v, the softmax output and attn@v;
- an MLP: ``fc1`` (SwiGLU: ``fc1_g`` and ``fc1_x``) with the MLP-input quantizer, ``fc2`` with the hidden
  activation's quantizer (GELU output: the config's rule; SwiGLU's gated product: signed);
- ``PatchEmbed.proj``, ``PatchMerging.reduction`` and the classifier(s) at ``edge_bits``.
LayerNorm, softmax, GELU / SiLU, residual adds, position embeddings (absolute, relative, RoPE), the class token,
SwinV2's cosine normalisation, logit scale and position-bias MLP stay in floating point.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import AttentionSpec
from .config import QuantConfig
from .modules import QuantAttention, QuantConv2d, QuantLinear
from .quantizers import Quantizer, QuantizerError
from .rules import Site, apply_rules


def _new_linear(weight: Tensor, bias: Tensor | None, like: nn.Parameter) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(like.requires_grad)
    return layer


def split_projections(spec: AttentionSpec) -> dict[str, nn.Linear]:
    """q, k and v as three linears (a fused qkv cut in three, losslessly). A key bias is frozen: ``q.(k + b)``
    shifts every logit of a query equally, so softmax ignores it, and its gradient is rounding noise that Adam
    would turn into full-size steps."""
    if "q" in spec.linears:
        layers = dict(spec.linears)
    else:
        src, d = spec.linears["qkv"], spec.num_heads * spec.head_dim
        w = src.weight.detach()
        if src.bias is not None:
            biases = [src.bias.detach()[i * d:(i + 1) * d] for i in range(3)]
        elif spec.qv_bias is not None:
            biases = [spec.qv_bias[0].detach(), None, spec.qv_bias[1].detach()]
        else:
            biases = [None] * 3
        layers = {key: _new_linear(w[i * d:(i + 1) * d], biases[i], src.weight) for i, key in enumerate("qkv")}
    if layers["k"].bias is not None and spec.rope_prefix is None and spec.logit_scale is None:
        layers["k"].bias.requires_grad_(False)
    return layers


def fused_projection(spec: AttentionSpec) -> tuple[nn.Linear, tuple[Tensor, Tensor] | None]:
    """One qkv linear (separate projections stacked, losslessly) and the q / v biases it does not hold."""
    if "qkv" in spec.linears:
        return spec.linears["qkv"], spec.qv_bias
    q, k, v = (spec.linears[key] for key in "qkv")
    w = torch.cat([layer.weight.detach() for layer in (q, k, v)])
    if k.bias is None and q.bias is not None:  # EVA: no key bias; q and v keep theirs outside the matmul
        return _new_linear(w, None, q.weight), (q.bias, v.bias)
    b = None if q.bias is None else torch.cat([layer.bias.detach() for layer in (q, k, v)])
    return _new_linear(w, b, q.weight), None


class _QatFactory:
    """Makes quantizers and quantized layers for one model from one config, naming each by its module path."""

    def __init__(self, config: QuantConfig):
        self.cfg = config

    def weight(self, path: str, kind: str, shape: torch.Size, heads: int | None = None,
               head_axis: int = 0) -> Quantizer:
        gran = self.cfg.granularity_for(kind, True)
        axis = head_axis if gran == "head" else 0
        return Quantizer(self.cfg.bits_for(f"{path}.weight_quant", kind, True), signed=True, granularity=gran,
                         axis=axis, size=shape[axis], num_groups=heads, is_weight=True,
                         grad_scale_mode=self.cfg.grad_scale, name=f"{path}.weight_quant", kind=kind)

    def act(self, name: str, kind: str, width: int, heads: int | None = None, axis: int = -1,
            signed: bool = True, offset: bool = False) -> Quantizer:
        gran = self.cfg.granularity_for(kind, False)
        return Quantizer(self.cfg.bits_for(name, kind, False), signed=signed, granularity=gran, axis=axis,
                         size=width, num_groups=heads, learn_offset=offset, is_weight=False,
                         grad_scale_mode=self.cfg.grad_scale, init_method=self.cfg.act_init, name=name,
                         kind=kind)

    def linear(self, layer: nn.Linear, path: str, kind: str, in_kind: str | None, heads: int | None = None,
               head_axis: int = 0, **act_kw) -> QuantLinear:
        wq = self.weight(path, kind, layer.weight.shape, heads, head_axis)
        iq = None if in_kind is None else self.act(f"{path}.input_quant", in_kind, layer.in_features,
                                                           heads=heads, **act_kw)
        return QuantLinear(layer, wq, iq)

    def layer(self, module: nn.Module, path: str, site: Site) -> nn.Module:
        """A rule's linear / convolution site, quantized."""
        if isinstance(module, (QuantLinear, QuantConv2d)):
            return module
        if site.conv:
            wq = self.weight(path, site.kind, module.weight.shape)
            iq = self.act(f"{path}.input_quant", site.in_kind, module.in_channels, axis=1)
            return QuantConv2d(module, wq, iq)
        act_kw = {"signed": self.cfg.gelu_signed, "offset": self.cfg.gelu_offset} if site.act == "gelu" else {}
        return self.linear(module, path, site.kind, site.in_kind, **act_kw)

    def attention(self, spec: AttentionSpec, path: str) -> QuantAttention:
        """A rule's attention block, quantized (q/k/v split or fused as the config says)."""
        heads = spec.num_heads
        qv_bias = None
        if self.cfg.split_qkv:
            qkv = {key: self.linear(layer, f"{path}.{key}", key, None, heads=heads)
                   for key, layer in split_projections(spec).items()}
        else:
            fused, qv_bias = fused_projection(spec)
            qkv = {"qkv": self.linear(fused, f"{path}.qkv", "qkv", None, heads=3 * heads)}
        proj = self.linear(spec.proj, f"{path}.proj", "proj", "attn_out", heads=heads, head_axis=1, axis=-1)

        def per_head(name: str, kind: str, **kw) -> Quantizer:
            return self.act(f"{path}.{name}", kind, heads, heads=heads, axis=1, **kw)

        return QuantAttention(
            spec, input_quant=self.act(f"{path}.input_quant", "attn_in", spec.in_features), qkv=qkv,
            q_quant=per_head("q_quant", "q_act"), k_quant=per_head("k_quant", "k_act"),
            v_quant=per_head("v_quant", "v_act"), attn_quant=per_head("attn_quant", "attn_prob", signed=False),
            proj=proj, qv_bias=qv_bias)


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Convert a timm ``VisionTransformer`` (ViT, DeiT, with or without distillation token),
    ``SwinTransformer``, ``SwinTransformerV2`` or ``Eva`` (EVA-02) in place for quantization-aware training, and
    return it.

    Every quantizer starts uninitialised: call ``vvtq.calibrate(model, batches)`` before training.
    """
    config = (config or QuantConfig.preset("vvtq")).validate()
    if getattr(model, "vvtq_config", None) is not None:
        raise QuantizerError("this model is already quantized (quantize_model was called on it before)")
    if apply_rules(model, _QatFactory(config)) == 0:
        raise QuantizerError(
            f"{type(model).__name__} has no supported transformer blocks: vvtq converts timm VisionTransformer "
            "(ViT, DeiT), SwinTransformer, SwinTransformerV2 and Eva (EVA-02) models"
        )
    model.vvtq_config = config
    return model
