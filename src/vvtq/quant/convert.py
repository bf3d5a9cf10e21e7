"""The one surgery pass: ``quantize_model(model, config)`` converts a timm ViT / DeiT / Swin in place.

Rules, one per timm building block (docs/METHOD.md §3):
- ``Attention`` / ``WindowAttention`` -> ``QuantAttention`` (qkv split losslessly into q, k, v when asked);
- ``Mlp``: ``fc1`` with the MLP-input quantizer, ``fc2`` with the GELU-output quantizer;
- ``PatchEmbed.proj``, ``PatchMerging.reduction`` and the classifier(s) at ``edge_bits``.
LayerNorm, softmax, GELU, residual adds, position embeddings and the class token stay in floating point.
"""
from __future__ import annotations

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from timm.models.swin_transformer import PatchMerging, WindowAttention
from torch import nn

from .config import QuantConfig
from .modules import QuantAttention, QuantConv2d, QuantLinear
from .quantizers import Quantizer, QuantizerError

_CLASSIFIER_PATHS = ("head", "head_dist", "head.fc")


class _Builder:
    """Makes quantizers for one model from one config, naming each by its module path."""

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

    def attention(self, src: nn.Module, path: str) -> QuantAttention:
        if getattr(src, "gate", None) is not None:
            raise QuantizerError(f"{path}: gated attention is not supported by vvtq")
        heads, head_dim = src.num_heads, src.qkv.out_features // (3 * src.num_heads)
        attn_dim = heads * head_dim
        if src.qkv.out_features != 3 * attn_dim:
            raise QuantizerError(f"{path}: the head count ({heads}) does not divide the qkv width "
                                 f"({src.qkv.out_features // 3})")
        if self.cfg.split_qkv:
            w, b = src.qkv.weight.detach(), src.qkv.bias
            qkv = {}
            for i, key in enumerate("qkv"):
                layer = nn.Linear(src.qkv.in_features, attn_dim, bias=b is not None,
                                  device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    layer.weight.copy_(w[i * attn_dim:(i + 1) * attn_dim])
                    if b is not None:
                        layer.bias.copy_(b.detach()[i * attn_dim:(i + 1) * attn_dim])
                layer.weight.requires_grad_(src.qkv.weight.requires_grad)
                if key == "k" and layer.bias is not None:
                    # q.(k + b) shifts every logit of a query equally, so softmax ignores the key bias: its
                    # gradient is rounding noise, which Adam would turn into full-size steps. Keep it fixed.
                    layer.bias.requires_grad_(False)
                qkv[key] = self.linear(layer, f"{path}.{key}", key, None, heads=heads)
        else:
            qkv = {"qkv": self.linear(src.qkv, f"{path}.qkv", "qkv", None, heads=3 * heads)}
        proj = self.linear(src.proj, f"{path}.proj", "proj", "attn_out", heads=heads, head_axis=1, axis=-1)
        rel_pos = src if isinstance(src, WindowAttention) else None
        attn = QuantAttention(
            heads, head_dim, src.scale,
            input_quant=self.act(f"{path}.input_quant", "attn_in", src.qkv.in_features),
            qkv=qkv,
            q_quant=self.act(f"{path}.q_quant", "q_act", heads, heads=heads, axis=1),
            k_quant=self.act(f"{path}.k_quant", "k_act", heads, heads=heads, axis=1),
            v_quant=self.act(f"{path}.v_quant", "v_act", heads, heads=heads, axis=1),
            attn_quant=self.act(f"{path}.attn_quant", "attn_prob", heads, heads=heads, axis=1, signed=False),
            proj=proj,
            q_norm=getattr(src, "q_norm", nn.Identity()), k_norm=getattr(src, "k_norm", nn.Identity()),
            norm=getattr(src, "norm", nn.Identity()), attn_drop=src.attn_drop, proj_drop=src.proj_drop,
            rel_pos=rel_pos,
        )
        if rel_pos is not None:  # the source keeps only its relative-position table and index
            for child in ("qkv", "proj", "attn_drop", "proj_drop", "softmax"):
                if hasattr(rel_pos, child):
                    delattr(rel_pos, child)
        return attn


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Convert a timm ``VisionTransformer`` (ViT, DeiT, with or without distillation token) or
    ``SwinTransformer`` in place for quantization-aware training, and return it.

    Every quantizer starts uninitialised: call ``vvtq.calibrate(model, batches)`` before training.
    """
    config = (config or QuantConfig.preset("vvtq")).validate()
    if getattr(model, "vvtq_config", None) is not None:
        raise QuantizerError("this model is already quantized (quantize_model was called on it before)")
    build = _Builder(config)
    counts = {"attention": 0}

    def visit(module: nn.Module, prefix: str) -> None:
        for cname, child in list(module.named_children()):
            path = prefix + cname
            if isinstance(child, (Attention, WindowAttention)):
                setattr(module, cname, build.attention(child, path))
                counts["attention"] += 1
            elif isinstance(child, Mlp) and isinstance(child.fc1, nn.Linear) and isinstance(child.fc2, nn.Linear):
                child.fc1 = build.linear(child.fc1, f"{path}.fc1", "fc1", "mlp_in")
                child.fc2 = build.linear(child.fc2, f"{path}.fc2", "fc2", "mlp_hidden",
                                         signed=config.gelu_signed, offset=config.gelu_offset)
            elif isinstance(child, PatchEmbed) and isinstance(child.proj, nn.Conv2d):
                conv = child.proj
                wq = build.weight(f"{path}.proj", "patch_embed", conv.weight.shape)
                iq = build.act(f"{path}.proj.input_quant", "patch_embed_in", conv.in_channels, axis=1)
                child.proj = QuantConv2d(conv, wq, iq)
            elif isinstance(child, PatchMerging):
                child.reduction = build.linear(child.reduction, f"{path}.reduction", "merge", "merge_in")
            else:
                visit(child, path + ".")

    visit(model, "")
    if counts["attention"] == 0:
        raise QuantizerError(
            f"{type(model).__name__} has no supported transformer blocks: vvtq converts timm VisionTransformer "
            "(ViT, DeiT) and SwinTransformer models"
        )
    for path in _CLASSIFIER_PATHS:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, attr, None)
        if isinstance(layer, nn.Linear) and not isinstance(layer, QuantLinear):
            setattr(parent, attr, build.linear(layer, path, "head", "head_in"))
    model.vvtq_config = config
    return model
