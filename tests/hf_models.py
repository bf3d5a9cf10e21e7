"""Tiny Hugging Face ``transformers`` image classifiers for the tests (random init, no download; importable as
``hf_models``): width 32, 2 layers, 32 px, 10 classes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

FAMILIES = ("vit", "deit", "deit_teacher", "swin", "dinov2", "dinov2_swiglu")
IMG = 32


def tiny_config(family: str, channels: int = 3, **changes):
    T = transformers
    common = {"num_channels": channels, "image_size": IMG, "num_labels": 10, **changes}
    if family == "swin":
        return T.SwinConfig(embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4, patch_size=4, **common)
    vit_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, **common)
    if family.startswith("dinov2"):
        return T.Dinov2Config(mlp_ratio=2, use_swiglu_ffn=family == "dinov2_swiglu", layerscale_value=0.5,
                              **vit_like)
    cfg = (T.DeiTConfig if family.startswith("deit") else T.ViTConfig)(intermediate_size=64, **vit_like)
    if family == "deit_teacher":
        cfg.architectures = ["DeiTForImageClassificationWithTeacher"]
    return cfg


def hf_class(family: str):
    T = transformers
    return {"vit": T.ViTForImageClassification, "deit": T.DeiTForImageClassification,
            "deit_teacher": T.DeiTForImageClassificationWithTeacher, "swin": T.SwinForImageClassification,
            "dinov2": T.Dinov2ForImageClassification, "dinov2_swiglu": T.Dinov2ForImageClassification}[family]


def tiny_hf(family: str, seed: int = 0, attn: str = "eager", channels: int = 3, **changes) -> nn.Module:
    """The raw HF model (eval mode), its weights at ordinary scale (HF initialises with std 0.02)."""
    torch.manual_seed(seed)
    model = hf_class(family)._from_config(tiny_config(family, channels, **changes), attn_implementation=attn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "position" not in name:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.ndim == 2 else 0.2)
            elif "relative_position_bias_table" in name or "position_embeddings" in name:
                nn.init.normal_(p, std=0.2)
    return model.eval()


def tiny(family: str, seed: int = 0, attn: str = "eager", channels: int = 3, **changes) -> nn.Module:
    """``tiny_hf`` as vvtq's classifier (``vvtq.hf.HFClassifier``: returns the logits)."""
    from vvtq.hf import HFClassifier

    return HFClassifier(tiny_hf(family, seed, attn, channels, **changes)).eval()


def images(batch: int = 4, seed: int = 1, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, IMG, IMG, generator=torch.Generator().manual_seed(seed))
