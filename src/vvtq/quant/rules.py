"""One rule per supported timm block: what is replaced, and which quantization sites it has.

Every pass walks a model with ``apply_rules``: the QAT conversion (``vvtq.quant.convert``), the integer runtime's
construction (``vvtq.export.runtime``) and, over a quantized model (``quantized=True``), both ONNX exports
(``vvtq.export.onnx``, ``vvtq.export.onnx_fast``). Each passes a *factory* that builds its own layers:
``layer(module, path, site)`` for a quantized linear / convolution, ``attention(spec, path)`` for an attention
block. A rule either lists the sites of a block's linears (``Site``: weight kind, input-activation kind), or reads
an attention module into an ``AttentionSpec`` (``vvtq.quant.attention``), the float parts every pass adopts. In a
quantized model the sites hold the quantized layers, and an attention block is a converted one (``AttentionCore``),
read back by ``CONVERTED``: its spec then carries its quantized projections and its activation quantizers.

Supported (docs/METHOD.md §3 says where the quantizers sit):

- ViT / DeiT / CLIP ``Attention``, Swin ``WindowAttention``;
- SwinV2 ``WindowAttention`` (Liu et al. 2022): cosine attention, its learned logit scale and continuous
  relative position bias MLP kept in float; q and k quantized after their L2 normalisation;
- EVA-02 ``EvaAttention`` (Fang et al. 2023): RoPE in float on q and k before they are quantized; separate q / v
  biases (the key has none);
- ``Mlp`` (GELU: ``fc1`` on the MLP input, ``fc2`` on the GELU output), EVA-02's SwiGLU (``GluMlp`` packed,
  ``SwiGLU`` split: the gated product ``SiLU(g) * x`` is signed, so ``fc2``'s input quantizer is signed without
  offset);
- ``PatchEmbed.proj``, Swin / SwinV2 ``PatchMerging.reduction`` and the classifier at ``edge_bits``.

Adding an architecture means adding its rule here (and its tests); nothing else walks a model. Another library's
classes (Hugging Face ``transformers``: ``vvtq.quant.rules_hf``) have their rules in a module of their own, which
joins this table with ``register_rules`` (``Extension``): it is imported, by name, the first time the walk meets a
class of that library (``EXTENSIONS``), so that vvtq imports without the library.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from timm.layers import Attention, AttentionRope, GluMlp, Mlp, PatchEmbed, SwiGLU
from timm.models import eva, swin_transformer, swin_transformer_v2
from torch import nn

from .attention import AttentionCore, AttentionSpec, L2Norm
from .quantizers import QuantizerError

CLASSIFIER_PATHS = ("head", "head_dist", "head.fc")


@dataclass(frozen=True)
class Site:
    """A quantized linear / convolution: its weight kind and the kind of the activation entering it.

    ``act``: how that activation is quantized: ``"signed"``, or ``"gelu"`` (the config's GELU-output rule:
    unsigned, with a learned offset in the ``vvtq`` preset)."""

    attr: str
    kind: str
    in_kind: str
    act: str = "signed"
    conv: bool = False


HEAD = Site("", "head", "head_in")


class Factory(Protocol):
    """What a surgery pass builds: its quantized layers and attention blocks."""

    def layer(self, module: nn.Module, path: str, site: Site) -> nn.Module: ...

    def attention(self, spec: AttentionSpec, path: str) -> nn.Module: ...


@dataclass(frozen=True)
class Rule:
    """``types``: the timm classes the rule matches (``when`` narrows it). Either ``sites`` (linears converted
    in place) or ``attention`` (the module is replaced by an attention block built from its spec).

    ``adapter`` (another library's attention, whose caller expects another signature): the replacement is
    ``adapter(source, block)``, a module that holds the factory's block as its child ``ADAPTED`` (named so, the
    block's path ends in ``.core``; a quantized model's walk finds the block there and replaces it alone)."""

    name: str
    types: tuple[type, ...]
    sites: tuple[Site, ...] = ()
    attention: Callable[[nn.Module, str], AttentionSpec] | None = None
    when: Callable[[nn.Module], bool] = lambda m: True
    adapter: Callable[[nn.Module, nn.Module], nn.Module] | None = None


ADAPTED = "core"


@dataclass(frozen=True)
class Extension:
    """Another library's part of the table (``register_rules``): its ``rules``; ``classifiers(model)``, the paths of
    the model's classifiers (quantized as ``HEAD``, after ``CLASSIFIER_PATHS``); ``finish(model)``, run at the end
    of every walk (e.g. what the library's own code reads from a replaced layer)."""

    rules: tuple[Rule, ...]
    classifiers: Callable[[nn.Module], Iterable[str]] = lambda model: ()
    finish: Callable[[nn.Module], None] = lambda model: None


# top-level package of a model's class -> the vvtq module that registers its rules (imported on first sight)
EXTENSIONS = {"transformers": "vvtq.quant.rules_hf"}
_REGISTERED: dict[str, Extension] = {}


def register_rules(library: str, extension: Extension) -> None:
    """Add (or replace) the rules of ``library`` (a top-level package name, e.g. ``"transformers"``)."""
    _REGISTERED[library] = extension


def _extension_for(module: nn.Module) -> None:
    library = type(module).__module__.partition(".")[0]
    if library in EXTENSIONS and library not in _REGISTERED:
        importlib.import_module(EXTENSIONS[library])  # registers itself


# --------------------------------------------------------------------------- attention specs
def _check_heads(src: nn.Module, path: str, width: int) -> tuple[int, int]:
    heads = int(src.num_heads)
    if width % heads:
        raise QuantizerError(f"{path}: the head count ({heads}) does not divide the qkv width ({width})")
    return heads, width // heads


def _no_gate(src: nn.Module, path: str) -> None:
    if getattr(src, "gate", None) is not None:
        raise QuantizerError(f"{path}: gated attention ({type(src).__name__} with a gate) is not supported by "
                             "vvtq: the sigmoid gate is a fourth projection of the block input with no "
                             "quantization rule")


def vit_attention(src: nn.Module, path: str) -> AttentionSpec:
    """timm ``Attention`` (ViT, DeiT, ...) and Swin's ``WindowAttention``: fused qkv with its bias."""
    _no_gate(src, path)
    heads, head_dim = _check_heads(src, path, src.qkv.out_features // 3)
    if src.qkv.out_features % 3:
        raise QuantizerError(f"{path}: the qkv projection's width ({src.qkv.out_features}) is not 3 x heads")
    window = isinstance(src, swin_transformer.WindowAttention)
    return AttentionSpec(
        heads, head_dim, src.qkv.in_features, {"qkv": src.qkv}, src.proj, scale=float(src.scale),
        q_norm=getattr(src, "q_norm", nn.Identity()), k_norm=getattr(src, "k_norm", nn.Identity()),
        norm=getattr(src, "norm", nn.Identity()), attn_drop=src.attn_drop, proj_drop=src.proj_drop,
        rel_pos=src if window else None,
        rel_pos_keep=("relative_position_bias_table", "relative_position_index"))


def _qv_bias(src: nn.Module):
    return None if src.q_bias is None else (src.q_bias, src.v_bias)


def swinv2_attention(src: nn.Module, path: str) -> AttentionSpec:
    """SwinV2 ``WindowAttention``: ``alpha_h cos(q, k) + 16 sigmoid(MLP(coords))``; bias-free qkv, q / v biases."""
    heads, head_dim = _check_heads(src, path, src.qkv.out_features // 3)
    return AttentionSpec(
        heads, head_dim, src.qkv.in_features, {"qkv": src.qkv}, src.proj, scale=1.0, qv_bias=_qv_bias(src),
        logit_scale=src.logit_scale, q_norm=L2Norm(), k_norm=L2Norm(), attn_drop=src.attn_drop,
        proj_drop=src.proj_drop, rel_pos=src,
        rel_pos_keep=("cpb_mlp", "relative_coords_table", "relative_position_index"))


def eva_attention(src: nn.Module, path: str) -> AttentionSpec:
    """EVA ``EvaAttention``: fused bias-free qkv with q / v biases, or separate q / k / v projections; RoPE."""
    _no_gate(src, path)
    if src.qkv is not None:
        linears, qv_bias = {"qkv": src.qkv}, _qv_bias(src)
    else:
        linears, qv_bias = {"q": src.q_proj, "k": src.k_proj, "v": src.v_proj}, None
    width = sum(layer.out_features for layer in linears.values()) // 3
    heads, head_dim = _check_heads(src, path, width)
    return AttentionSpec(
        heads, head_dim, next(iter(linears.values())).in_features, linears, src.proj, scale=float(src.scale),
        qv_bias=qv_bias, q_norm=src.q_norm, k_norm=src.k_norm, norm=src.norm, attn_drop=src.attn_drop,
        proj_drop=src.proj_drop, rope_prefix=int(src.num_prefix_tokens),
        rope_half=bool(getattr(src, "rotate_half", False)))


def refuse_rope_attention(src: nn.Module, path: str) -> AttentionSpec:
    """timm's ``AttentionRope`` (EVA with ``attn_type="rope"``, RoPE ViTs) is refused, not half-converted."""
    raise QuantizerError(f"{path}: {type(src).__name__} (RoPE attention with optional grouped-query k/v heads) "
                         "is not supported by vvtq: its k/v head count may differ from q's, which the per-head "
                         "quantizers of k and v do not model; EVA-02's EvaAttention (attn_type='eva') is")


def converted_attention(src: nn.Module, path: str) -> AttentionSpec:
    """An attention block this table converted (``AttentionCore``: the QAT model's ``QuantAttention``), read back
    with its quantized projections and activation quantizers (``AttentionCore.spec``)."""
    return src.spec()


# --------------------------------------------------------------------------- the table
def _linear(*attrs: str) -> Callable[[nn.Module], bool]:
    return lambda m: all(isinstance(getattr(m, a, None), nn.Linear) for a in attrs)


_MERGE = (Site("reduction", "merge", "merge_in"),)

RULES: tuple[Rule, ...] = (
    Rule("ViT attention", (Attention, swin_transformer.WindowAttention), attention=vit_attention),
    Rule("SwinV2 window attention", (swin_transformer_v2.WindowAttention,), attention=swinv2_attention),
    Rule("EVA attention", (eva.EvaAttention,), attention=eva_attention),
    Rule("RoPE attention (refused)", (AttentionRope,), attention=refuse_rope_attention),
    Rule("MLP", (Mlp,), (Site("fc1", "fc1", "mlp_in"), Site("fc2", "fc2", "mlp_hidden", act="gelu")),
         when=_linear("fc1", "fc2")),
    Rule("SwiGLU (packed)", (GluMlp,), (Site("fc1", "fc1", "mlp_in"), Site("fc2", "fc2", "mlp_hidden")),
         when=_linear("fc1", "fc2")),
    Rule("SwiGLU", (SwiGLU,), (Site("fc1_g", "fc1", "mlp_in"), Site("fc1_x", "fc1", "mlp_in"),
                               Site("fc2", "fc2", "mlp_hidden")), when=_linear("fc1_g", "fc1_x", "fc2")),
    Rule("patch embedding", (PatchEmbed,), (Site("proj", "patch_embed", "patch_embed_in", conv=True),),
         when=lambda m: isinstance(m.proj, nn.Conv2d)),
    Rule("Swin patch merging", (swin_transformer.PatchMerging,), _MERGE),
    Rule("SwinV2 patch merging", (swin_transformer_v2.PatchMerging,), _MERGE),
)
# the one rule of a quantized model's walk (``apply_rules(..., quantized=True)``) that a timm model has no use for
CONVERTED = Rule("converted attention", (AttentionCore,), attention=converted_attention)


def rule_for(module: nn.Module, quantized: bool = False) -> Rule | None:
    """The rule that matches ``module`` (in a quantized model: ``CONVERTED`` first), or None."""
    _extension_for(module)
    extra = tuple(rule for ext in _REGISTERED.values() for rule in ext.rules)
    for rule in (CONVERTED, *RULES, *extra) if quantized else (*RULES, *extra):
        if isinstance(module, rule.types) and rule.when(module):
            return rule
    return None


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def apply_rules(model: nn.Module, factory: Factory, quantized: bool = False) -> int:
    """Replace every supported block of ``model`` in place with ``factory``'s layers; return the number of
    attention blocks. The classifier (``CLASSIFIER_PATHS``) comes last, as one more quantized linear.

    ``quantized``: ``model`` was converted by this table (the ONNX exports walk it): the sites hold its quantized
    layers and its attention blocks are read back by ``CONVERTED``; a timm attention block left in it is refused."""
    count = 0

    def visit(module: nn.Module, prefix: str) -> None:
        nonlocal count
        for cname, child in list(module.named_children()):
            path = prefix + cname
            rule = rule_for(child, quantized)
            if rule is None:
                visit(child, path + ".")
            elif rule.attention is not None:
                spec = rule.attention(child, path)
                if quantized and spec.quantizers is None:
                    raise QuantizerError(f"{path}: {type(child).__name__} was not converted by vvtq.quantize_model "
                                         "(a quantized model is expected)")
                if rule.adapter is None:
                    setattr(module, cname, factory.attention(spec, path))
                else:
                    setattr(module, cname, rule.adapter(child, factory.attention(spec, f"{path}.{ADAPTED}")))
                count += 1
            else:
                for site in rule.sites:
                    setattr(child, site.attr, factory.layer(getattr(child, site.attr), f"{path}.{site.attr}", site))

    visit(model, "")
    extensions = list(_REGISTERED.values())
    for path in (*CLASSIFIER_PATHS, *(p for ext in extensions for p in ext.classifiers(model))):
        parent_path, _, attr = path.rpartition(".")
        parent = _submodule(model, parent_path)
        layer = getattr(parent, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(parent, attr, factory.layer(layer, path, HEAD))
    for ext in extensions:
        ext.finish(model)
    return count


def export_copy(model: nn.Module, factory: Factory) -> nn.Module:
    """A float32 eval-mode copy of a quantized ``model``, walked by the rule table with an export's ``factory``
    (``apply_rules(..., quantized=True)``), its parameters frozen. Both ONNX exports start here."""
    import copy

    m = copy.deepcopy(model).float().eval()
    apply_rules(m, factory, quantized=True)
    for p in m.parameters():
        p.requires_grad_(False)
    return m
