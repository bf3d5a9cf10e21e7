"""Small registered ViT variants for 28-32 px images (Fashion-MNIST), built from timm's own classes.

``timm.create_model("mini_deit")`` and ``timm.create_model("mini_swin")`` work once ``vvtq`` is imported.
Both take ``in_chans`` (1 or 3) and ``num_classes``; they are trained from scratch here.
"""
from __future__ import annotations

from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .errors import ConfigError

MINI_DEIT = dict(img_size=28, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0,
                 qkv_bias=True)
MINI_SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2),
                 num_heads=(2, 4, 8), mlp_ratio=4.0)
MODEL_DEFAULTS = {"mini_deit": MINI_DEIT, "mini_swin": MINI_SWIN}


def _kwargs(defaults: dict, kwargs: dict) -> dict:
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    return {**defaults, "in_chans": 1, "num_classes": 10, **kwargs}


@register_model
def mini_deit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-style ViT: 28 px, patch 4 (7x7 tokens + class token), width 96, 6 blocks, 3 heads (~0.7 M)."""
    if pretrained:
        raise ConfigError("mini_deit has no hub weights; vvtq ships its own teacher (see vvtq.assets)")
    return VisionTransformer(**_kwargs(MINI_DEIT, kwargs))


@register_model
def mini_swin(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin: 32 px, patch 2 (16x16 tokens), window 4, widths 48/96/192, depths 2/2/2 (~1.2 M)."""
    if pretrained:
        raise ConfigError("mini_swin has no hub weights (pretrained: false)")
    return SwinTransformer(**_kwargs(MINI_SWIN, kwargs))
