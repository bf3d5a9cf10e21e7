"""The arithmetic of quantized multi-head attention, written once for the QAT model, the integer runtime and the
ONNX exports.

``AttentionCore.forward`` is the whole computation; the subclasses only say how an activation becomes codes
(``vvtq.quant.modules.QuantAttention``: the training quantizers; ``vvtq.export.runtime.IntAttention``: scales
read from a packed file; ``vvtq.export.onnx.OnnxAttention``: QDQ ops; ``vvtq.export.onnx_fast.FastAttention``:
uint8 / int8 codes for onnxruntime's integer kernels) and where the projections come from. ``attend`` fixes the
order of the scores, bias, softmax, its quantizer and attn@v for every path that writes the matmuls itself. With
per-head codes ``C`` and step sizes ``s``:

    q, k, v  = split(Q_in(x) W_qkv^T + b)                          (the projections, on codes)
    q, k     = rope(q_norm(q)), rope(k_norm(k))                    (float: qk norm, cosine normalisation, RoPE)
    logits   = alpha[h] * s_q[h] s_k[h] (C_q @ C_k^T) + bias       (integer accumulation, ``intmath``)
    out      = s_p[h] s_v[h] (C_p @ C_v),  C_p = Q_p(softmax(logits))
    y        = proj(Q_out(norm(out)))

``alpha`` is ``1/sqrt(d)`` (ViT, DeiT, Swin, EVA), or SwinV2's learned per-head logit scale
``exp(min(tau_h, log 100))`` on cosine attention (q and k L2-normalised; Liu et al. 2022, "Swin Transformer V2:
Scaling Up Capacity and Resolution", §3.2). ``bias`` is Swin's relative position table, SwinV2's continuous
relative position bias ``16 sigmoid(MLP(log-spaced coordinates))``, plus the shifted-window mask; or a ViT mask.
RoPE (EVA-02: Fang et al. 2023, "EVA-02: A Visual Representation for Neon Genesis") rotates q and k of the
non-prefix tokens before they are quantized, so the matmul still runs on codes. Norms, RoPE, the logit scale,
the bias MLP and the softmax stay in floating point, as LayerNorm and GELU do.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from torch import Tensor, nn

from .intmath import QT, int_attention

_MAX_LOGIT_SCALE = math.log(100.0)  # SwinV2 clamps its learned logit scale at 100


class L2Norm(nn.Module):
    """``x / max(||x||_2, eps)`` along the last axis: SwinV2's cosine attention normalises q and k per head."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


@dataclass
class AttentionSpec:
    """What a rule (``vvtq.quant.rules``) reads from a timm attention module: the float parts every pass adopts
    as they are, and the source projections (``linears``: ``{"qkv": fused}`` or ``{"q", "k", "v"}``). Read from a
    converted block (``AttentionCore.spec``), the projections are its quantized ones and ``quantizers`` is set."""

    num_heads: int
    head_dim: int
    in_features: int
    linears: dict[str, nn.Linear]
    proj: nn.Linear
    scale: float = 1.0
    qv_bias: tuple[Tensor, Tensor] | None = None  # separate q / v biases of a bias-free fused qkv (k bias: 0)
    logit_scale: nn.Parameter | None = None  # SwinV2 cosine attention
    q_norm: nn.Module = field(default_factory=nn.Identity)
    k_norm: nn.Module = field(default_factory=nn.Identity)
    norm: nn.Module = field(default_factory=nn.Identity)
    attn_drop: nn.Module = field(default_factory=nn.Identity)
    proj_drop: nn.Module = field(default_factory=nn.Identity)
    rope_prefix: int | None = None  # EVA: RoPE applies after this many prefix tokens; None: no RoPE
    rope_half: bool = False
    rel_pos: nn.Module | None = None  # the source module, kept for its position tables only
    rel_pos_keep: tuple[str, ...] | None = ()  # None: ``rel_pos`` is already reduced (a converted block's)
    quantizers: dict[str, nn.Module | None] | None = None  # a converted block's (``ACT_QUANTIZERS``); timm's: None

    def position_holder(self) -> nn.Module | None:
        """The source module reduced to its relative-position members (everything else was adopted)."""
        src = self.rel_pos
        if src is not None and self.rel_pos_keep is not None:
            for table in (src._modules, src._parameters, src._buffers):
                for name in [n for n in table if n not in self.rel_pos_keep]:
                    delattr(src, name)
        return src


def relative_position_bias(holder: nn.Module, num_heads: int) -> Tensor:
    """[1, H, N, N] from the source window attention: Swin's learned table ``B[idx]``, or SwinV2's continuous
    bias ``16 * sigmoid(MLP(coords)[idx])`` (Liu et al. 2022, §3.3)."""
    if not hasattr(holder, "cpb_mlp"):
        return holder._get_rel_pos_bias()
    index = holder.relative_position_index
    n = index.shape[0]
    table = holder.cpb_mlp(holder.relative_coords_table).view(-1, num_heads)
    bias = table[index.view(-1)].view(n, n, num_heads).permute(2, 0, 1).contiguous()
    return (16 * torch.sigmoid(bias)).unsqueeze(0)


def attention_bias(rel_pos: nn.Module | None, num_heads: int, N: int, B: int, mask: Tensor | None,
                   dtype: torch.dtype = torch.float) -> Tensor | None:
    """Additive attention bias [B or 1, H, N, N]: Swin's relative positions (``rel_pos`` is the source window
    attention) plus its shifted-window mask [num_windows, N, N]; or a ViT mask (bool masks become 0 / -inf)."""
    bias = None
    if rel_pos is not None:
        bias = relative_position_bias(rel_pos, num_heads)
        if mask is not None:
            num_win = mask.shape[0]
            mask = mask.view(1, num_win, 1, N, N).expand(B // num_win, -1, num_heads, -1, -1)
            bias = bias + mask.reshape(-1, num_heads, N, N)
    elif mask is not None:
        bias = mask if mask.dtype != torch.bool else torch.zeros_like(mask, dtype=dtype).masked_fill(
            ~mask, float("-inf"))
    return bias


Act = Callable[[nn.Module | None, Tensor], Tensor | QT]
Matmul = Callable[[Tensor, Tensor], Tensor]
ACT_QUANTIZERS = ("input_quant", "q_quant", "k_quant", "v_quant", "attn_quant")


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scores: Matmul, probs: Callable[[Tensor], Tensor],
           mix: Matmul) -> Tensor:
    """``mix(probs(softmax(scores(q, k^T) + bias)), v)`` on [B, H, N, d]: the order of the attention arithmetic,
    whatever runs its matmuls. ``scores`` applies ``alpha`` (and the step sizes of q and k, on codes), ``probs``
    quantizes the softmax output (then drops out), ``mix`` is attn@v."""
    logits = scores(q, k.transpose(-2, -1))
    if bias is not None:
        logits = logits + bias
    return mix(probs(logits.softmax(dim=-1)), v)


class AttentionCore(nn.Module):
    """Multi-head self-attention with quantizers on the block input, q, k, v (per head), the softmax output
    and attn@v (the module docstring's formula). Subclasses set the quantizers and define ``_integer_now``,
    ``_codes`` (an activation as codes) and ``_fake`` (as fake-quantized floats)."""

    def __init__(self, spec: AttentionSpec, *, input_quant: nn.Module | None, qkv: dict[str, nn.Module],
                 q_quant: nn.Module | None, k_quant: nn.Module | None, v_quant: nn.Module | None,
                 attn_quant: nn.Module | None, proj: nn.Module, qv_bias: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = spec.num_heads, spec.head_dim, spec.scale
        self.attn_dim = spec.num_heads * spec.head_dim
        self.input_quant = input_quant
        for key, layer in qkv.items():  # "qkv", or "q", "k", "v"
            setattr(self, key, layer)
        self.split = "q" in qkv
        self.q_norm, self.k_norm = spec.q_norm, spec.k_norm
        self.q_quant, self.k_quant, self.v_quant, self.attn_quant = q_quant, k_quant, v_quant, attn_quant
        self.attn_drop = spec.attn_drop
        self.norm = spec.norm
        self.proj = proj
        self.proj_drop = spec.proj_drop
        # Swin: the relative position tables stay in the source module (kept as a child so that their parameters
        # keep meaningful names); ``relative_position_bias`` turns them into [1, H, N, N]
        self.rel_pos = spec.position_holder()
        self.logit_scale = spec.logit_scale  # SwinV2: a learned parameter [H, 1, 1]; else None
        if qv_bias is not None:  # a fused qkv without bias: q and v biases of its own, the key's fixed at 0
            self.q_bias, self.v_bias = qv_bias
        else:
            self.q_bias = self.v_bias = None
        self.rope_prefix, self.rope_half = spec.rope_prefix, spec.rope_half

    def spec(self) -> AttentionSpec:
        """This block read back as a spec (the rule of a converted block, ``vvtq.quant.rules``): its float parts,
        its projections and its activation quantizers, from which the ONNX exports build their own blocks."""
        linears = {key: getattr(self, key) for key in (("q", "k", "v") if self.split else ("qkv",))}
        return AttentionSpec(
            self.num_heads, self.head_dim, next(iter(linears.values())).in_features, linears, self.proj,
            scale=self.scale, qv_bias=None if self.q_bias is None else (self.q_bias, self.v_bias),
            logit_scale=self.logit_scale, q_norm=self.q_norm, k_norm=self.k_norm, norm=self.norm,
            attn_drop=self.attn_drop, proj_drop=self.proj_drop, rope_prefix=self.rope_prefix,
            rope_half=self.rope_half, rel_pos=self.rel_pos, rel_pos_keep=None,
            quantizers={name: getattr(self, name) for name in ACT_QUANTIZERS})

    # ----------------------------------------------------------------- set by the subclasses
    def _integer_now(self, x: Tensor) -> bool:
        raise NotImplementedError

    def _codes(self, quant: nn.Module | None, x: Tensor) -> Tensor | QT:
        raise NotImplementedError

    def _fake(self, quant: nn.Module | None, x: Tensor) -> Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------- the shared arithmetic
    def _heads(self, t: Tensor, B: int, N: int) -> Tensor:
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _project(self, x: Tensor | QT, B: int, N: int) -> tuple[Tensor, Tensor, Tensor]:
        if self.split:
            return tuple(self._heads(layer(x), B, N) for layer in (self.q, self.k, self.v))
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _rope(self, t: Tensor, rope: Tensor | None) -> Tensor:
        if rope is None or self.rope_prefix is None:
            return t
        n = self.rope_prefix
        rotated = apply_rot_embed_cat(t[:, :, n:], rope, half=self.rope_half)
        return torch.cat([t[:, :, :n], rotated], dim=2).type_as(t)

    def logit_multiplier(self) -> float | Tensor:
        """``alpha``: ``scale`` (a float), or SwinV2's per-head ``exp(min(tau, log 100))`` [H, 1, 1]."""
        if self.logit_scale is None:
            return self.scale
        return torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()

    def _fake_attention(self, q: Tensor, k: Tensor, v: Tensor, alpha: float | Tensor,
                        bias: Tensor | None) -> Tensor:
        """Training: softmax explicit when its output is quantized, else fused (``scaled_dot_product_attention``)."""
        quant = self.attn_quant
        if quant is None or not getattr(quant, "enabled", True):
            if isinstance(alpha, Tensor):
                q, alpha = q * alpha, 1.0
            kw = {} if alpha == q.shape[-1] ** -0.5 else {"scale": alpha}  # the default scale: pass nothing
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                  dropout_p=self.attn_drop.p if self.training else 0.0, **kw)
        return attend(q, k, v, bias, lambda a, kt: (a * alpha) @ kt,
                      lambda p: self.attn_drop(self._fake(quant, p)), torch.matmul)

    def _attention(self, q: Tensor | QT, k: Tensor | QT, v: Tensor | QT, bias: Tensor | None,
                   integer: bool) -> Tensor:
        """``softmax(alpha q k^T + bias) @ v`` [B, H, N, d], as the output projection takes it (the fast ONNX
        export: its input codes)."""
        alpha = self.logit_multiplier()
        if integer:  # ``attend``'s order on QT operands, in ``intmath`` with the exact integer matmuls
            probs = None if self.attn_quant is None else (lambda p: self._codes(self.attn_quant, p))
            return int_attention(q, k, v, alpha, bias, probs)
        return self._fake_attention(q, k, v, alpha, bias)

    def forward(self, x: Tensor, mask: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False, rope: Tensor | None = None) -> Tensor:
        if is_causal:
            raise NotImplementedError("vvtq's quantized attention does not support causal masks")
        B, N, _ = x.shape
        integer = self._integer_now(x)
        act: Act = self._codes if integer else self._fake
        q, k, v = self._project(act(self.input_quant, x), B, N)
        q, k = self._rope(self.q_norm(q), rope), self._rope(self.k_norm(k), rope)
        q, k, v = act(self.q_quant, q), act(self.k_quant, k), act(self.v_quant, v)
        bias = attention_bias(self.rel_pos, self.num_heads, N, B, mask if mask is not None else attn_mask,
                              dtype=x.dtype)
        out = self._attention(q, k, v, bias, integer)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(out))
