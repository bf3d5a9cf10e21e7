"""The rule table's part for Hugging Face ``transformers`` vision models (the module layout of transformers 5).

Registered into ``vvtq.quant.rules`` (``register_rules``) when the walk first meets a ``transformers`` class, so
the QAT conversion, the integer runtime and both ONNX exports read these rules as they read the timm ones:

- ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), DeiT (Touvron et al. 2021, "Training
  data-efficient image transformers & distillation through attention") and DINOv2 (Oquab et al. 2024, "DINOv2:
  Learning Robust Visual Features without Supervision") attention: separate ``q_proj`` / ``k_proj`` / ``v_proj``
  and ``o_proj``, read into an ``AttentionSpec`` and replaced by the factory's block behind ``HFAttention``, which
  keeps the HF module's call (``hidden_states, attention_mask, **kwargs``) and its return ``(output, weights)``
  (weights: None, as HF's SDPA path returns). DINOv2's layer scale and drop path sit in the layer, in float;
- Swin (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows") attention:
  the same, with its relative position table in float and the shifted-window mask [num_windows, N, N] the layer
  passes, added to the logits as in timm's ``WindowAttention``;
- the MLPs (``fc1`` on the MLP input, ``fc2`` on the activation's output: the GELU rule, unsigned with a learned
  offset in the ``vvtq`` preset), DINOv2's SwiGLU (``gate_proj`` / ``up_proj`` on the MLP input, ``down_proj`` on
  the signed gated product), the patch embeddings' ``projection`` and Swin's ``SwinPatchMerging.reduction`` at
  ``edge_bits``, and the classifiers (``classifier``; DeiT's ``cls_classifier`` and ``distillation_classifier``).

Whatever attention implementation the model was loaded with (``eager``, ``sdpa``), the converted block computes
vvtq's explicit attention (``AttentionCore``); the HF attention interface is no longer called. The quantizer
placement is the timm blocks' (Huang, Shen, Cheng 2023, "Variation-aware Vision Transformer Quantization", §3.2:
per-head q / k / v / softmax / attn@v scales, the softmax output unsigned).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.deit import modeling_deit as deit
from transformers.models.dinov2 import modeling_dinov2 as dinov2
from transformers.models.swin import modeling_swin as swin
from transformers.models.vit import modeling_vit as vit

from .attention import AttentionSpec
from .quantizers import QuantizerError
from .rules import Extension, Rule, Site, register_rules

VIT_ATTENTION = (vit.ViTAttention, deit.DeiTAttention, dinov2.Dinov2Attention)
MLPS = (vit.ViTMLP, deit.DeiTMLP, swin.SwinMLP, dinov2.Dinov2MLP)
PATCH_EMBEDDINGS = (vit.ViTPatchEmbeddings, deit.DeiTPatchEmbeddings, swin.SwinPatchEmbeddings,
                    dinov2.Dinov2PatchEmbeddings)
CLASSIFIER_MODELS = (vit.ViTForImageClassification, deit.DeiTForImageClassification,
                     deit.DeiTForImageClassificationWithTeacher, swin.SwinForImageClassification,
                     dinov2.Dinov2ForImageClassification)
CLASSIFIER_ATTRS = ("classifier", "cls_classifier", "distillation_classifier")
# activations whose output the GELU-output rule quantizes faithfully (non-negative, or nearly: a learned offset)
_ACTIVATIONS = ("gelu", "relu", "silu", "swish")


class HFAttention(nn.Module):
    """A converted block (``core``: ``AttentionCore``) behind the call of an HF attention module:
    ``forward(hidden_states, attention_mask=None, **kwargs) -> (output, None)``. ``attention_mask`` is an additive
    float mask or a boolean one (True: attend), [B or 1, 1, N, N]; Swin's layer passes its shifted-window mask
    [num_windows, N, N]."""

    def __init__(self, src: nn.Module, core: nn.Module):
        super().__init__()
        self.source = type(src).__name__
        self.core = core

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                **kwargs) -> tuple[Tensor, None]:
        if attention_mask is not None and not isinstance(attention_mask, Tensor):
            raise QuantizerError(f"{self.source}: vvtq's quantized attention takes a tensor mask, not a "
                                 f"{type(attention_mask).__name__} (load the model with attn_implementation='eager' "
                                 "or 'sdpa')")
        return self.core(hidden_states, attention_mask), None

    def extra_repr(self) -> str:
        return f"source={self.source}"


class SwinPositionBias(nn.Module):
    """Holds HF Swin's ``SwinRelativePositionBias`` (the learned table, indexed per window): the position source
    ``vvtq.quant.attention.attention_bias`` reads (``_get_rel_pos_bias`` -> [1, H, N, N])."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.relative_position_bias = table

    def _get_rel_pos_bias(self) -> Tensor:
        return self.relative_position_bias()


# --------------------------------------------------------------------------- attention specs
def _projections(src: nn.Module, path: str) -> dict[str, nn.Linear]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    layers = {name: getattr(src, name, None) for name in names}
    if not all(isinstance(layer, nn.Linear) for layer in layers.values()):
        raise QuantizerError(f"{path}: {type(src).__name__} has no q_proj / k_proj / v_proj / o_proj linears (the "
                             "layout of transformers 5); vvtq's rules for transformers need transformers>=5")
    return layers


def _spec(src: nn.Module, path: str, **extra) -> AttentionSpec:
    layers = _projections(src, path)
    heads, head_dim = int(src.num_attention_heads), int(src.head_dim)
    widths = {layers[n].out_features for n in ("q_proj", "k_proj", "v_proj")}
    if widths != {heads * head_dim}:
        raise QuantizerError(f"{path}: {type(src).__name__} projects q, k, v to widths {sorted(widths)}, not "
                             f"{heads} heads x {head_dim}: grouped k/v heads have no per-head quantizers in vvtq")
    if getattr(src, "is_causal", False):
        raise QuantizerError(f"{path}: {type(src).__name__} is causal; vvtq's quantized attention is not")
    return AttentionSpec(
        heads, head_dim, layers["q_proj"].in_features,
        {"q": layers["q_proj"], "k": layers["k_proj"], "v": layers["v_proj"]}, layers["o_proj"],
        scale=float(src.scaling), attn_drop=nn.Dropout(float(src.attention_dropout)), **extra)


def hf_attention(src: nn.Module, path: str) -> AttentionSpec:
    """ViT / DeiT / DINOv2 ``*Attention``: ``softmax(q k^T / sqrt(d) + mask) v``, then ``o_proj``."""
    return _spec(src, path)


def hf_swin_attention(src: nn.Module, path: str) -> AttentionSpec:
    """Swin ``SwinAttention``: window attention with the learned relative position table (kept in float)."""
    table = getattr(src, "relative_position_bias", None)
    if not isinstance(table, swin.SwinRelativePositionBias):
        raise QuantizerError(f"{path}: {type(src).__name__} has no SwinRelativePositionBias")
    return _spec(src, path, rel_pos=SwinPositionBias(table), rel_pos_keep=None)


# --------------------------------------------------------------------------- MLPs, the ends
def _activation_ok(m: nn.Module) -> bool:
    """An MLP whose activation the GELU-output rule fits (GELU, ReLU, SiLU); any other is refused."""
    act = m.activation_fn
    name = type(act).__name__.lower()
    unbounded_below = any(n in name for n in ("leaky", "prelu", "rrelu"))  # "relu" in the name, negatives too
    if any(a in name for a in _ACTIVATIONS) and not unbounded_below:
        return True
    raise QuantizerError(f"{type(m).__name__}: its activation {type(act).__name__} has no quantization rule in "
                         "vvtq (GELU, ReLU and SiLU outputs are quantized unsigned, with a learned offset)")


def classifier_paths(model: nn.Module):
    """The classifier linears of the HF image classifiers in ``model`` (``HEAD`` sites)."""
    for name, m in model.named_modules():
        if isinstance(m, CLASSIFIER_MODELS):
            for attr in CLASSIFIER_ATTRS:
                if isinstance(getattr(m, attr, None), nn.Module):
                    yield f"{name}.{attr}" if name else attr


def add_dtype_probes(model: nn.Module) -> None:
    """ViT, DeiT and DINOv2 cast the pixels to ``patch_embeddings.projection.weight.dtype``: a replaced
    projection (the runtime's, an export's) without a float ``weight`` gets an empty one (not saved)."""
    for m in model.modules():
        if isinstance(m, PATCH_EMBEDDINGS) and not isinstance(getattr(m.projection, "weight", None), Tensor):
            m.projection.__dict__.pop("weight", None)
            m.projection.register_buffer("weight", torch.zeros(0), persistent=False)


HF_RULES: tuple[Rule, ...] = (
    Rule("HF ViT / DeiT / DINOv2 attention", VIT_ATTENTION, attention=hf_attention, adapter=HFAttention),
    Rule("HF Swin window attention", (swin.SwinAttention,), attention=hf_swin_attention, adapter=HFAttention),
    Rule("HF MLP", MLPS, (Site("fc1", "fc1", "mlp_in"), Site("fc2", "fc2", "mlp_hidden", act="gelu")),
         when=_activation_ok),
    Rule("HF DINOv2 SwiGLU", (dinov2.Dinov2SwiGLUFFN,),
         (Site("gate_proj", "fc1", "mlp_in"), Site("up_proj", "fc1", "mlp_in"),
          Site("down_proj", "fc2", "mlp_hidden"))),
    Rule("HF patch embedding", PATCH_EMBEDDINGS, (Site("projection", "patch_embed", "patch_embed_in", conv=True),),
         when=lambda m: isinstance(m.projection, nn.Conv2d)),
    Rule("HF Swin patch merging", (swin.SwinPatchMerging,), (Site("reduction", "merge", "merge_in"),)),
)

register_rules("transformers", Extension(HF_RULES, classifiers=classifier_paths, finish=add_dtype_probes))
