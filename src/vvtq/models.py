"""Small registered models for 28-32 px images (Fashion-MNIST, CIFAR-10), trained from scratch here.

``timm.create_model("mini_deit")``, ``"mini_swin"`` and ``"cifar_resnet"`` work once ``vvtq`` is imported. All
take ``in_chans`` and ``num_classes``. The two minis are ViT students built from timm's own classes; the small
ResNet is the strong CNN teacher for the CIFAR-10 study.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import ClassifierHead
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import ConfigError

MINI_DEIT = dict(img_size=28, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0,
                 qkv_bias=True)
MINI_SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2),
                 num_heads=(2, 4, 8), mlp_ratio=4.0)
CIFAR_RESNET = dict(widths=(64, 256, 256), stem_width=32)
MODEL_DEFAULTS = {"mini_deit": MINI_DEIT, "mini_swin": MINI_SWIN, "cifar_resnet": CIFAR_RESNET}


def _kwargs(defaults: dict, kwargs: dict) -> dict:
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    return {"in_chans": 1, "num_classes": 10, **defaults, **kwargs}


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


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 conv (no bias), an optional 2x2 max-pool, BatchNorm, GELU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.GELU()]
    return nn.Sequential(*layers)


class ConvGroup(nn.Module):
    """One resolution: ``conv-pool-BN-GELU`` to ``c_out`` channels at half the size, then a residual
    ``x + conv-BN-GELU(x)`` (the conv-pool order of Jordan's airbench; the residual of Page's ResNet-9)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.down = _conv_bn(c_in, c_out, pool=True)
        self.res = _conv_bn(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.res(x)


class CifarResNet(nn.Module):
    """A small ResNet for 32 px images: a 3x3 stem, three groups that halve the size (32 -> 16 -> 8 -> 4), global
    max-pool and a linear head whose logits are multiplied by ``logit_scale`` (Page's 0.125: without it the
    max-pooled features give large logits and SGD at lr 0.2 is unstable in warmup). At widths 64/256/256 it has
    2.0 M parameters.

    The fast CIFAR-10 training line of work (Page 2018 "How to train your ResNet"; Jordan 2024, "94% on CIFAR-10
    in 3.29 seconds") reaches 94% with nets of this shape in 10-20 epochs. Not for quantization: it is a teacher.
    """

    def __init__(self, widths: Sequence[int] = (64, 256, 256), stem_width: int = 32, in_chans: int = 3,
                 num_classes: int = 10, drop_rate: float = 0.0, logit_scale: float = 0.125):
        super().__init__()
        self.logit_scale = float(logit_scale)
        self.num_classes, self.num_features = num_classes, int(widths[-1])
        self.stem = _conv_bn(in_chans, stem_width)
        chans = [stem_width, *widths]
        self.groups = nn.Sequential(*(ConvGroup(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)))
        self.head = ClassifierHead(self.num_features, num_classes, pool_type="max", drop_rate=drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.groups(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)) * self.logit_scale


@register_model
def cifar_resnet(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The CIFAR-10 teacher: a ResNet-9-style CNN, widths 64/256/256 (2.0 M parameters, 32 px RGB)."""
    if pretrained:
        raise ConfigError("cifar_resnet has no hub weights; train it with the recipe cifar10_teacher_fp")
    kwargs.pop("drop_path_rate", None)  # no stochastic depth in a 7-conv net
    return CifarResNet(**_kwargs({**CIFAR_RESNET, "in_chans": 3}, kwargs))
