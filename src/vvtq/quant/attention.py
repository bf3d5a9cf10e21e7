"""The arithmetic of quantized multi-head attention, written once for the QAT model and the integer runtime.

``AttentionCore.forward`` is the whole computation; the two subclasses only say how an activation becomes codes
(``vvtq.quant.modules.QuantAttention``: the training quantizers; ``vvtq.export.runtime.IntAttention``: scales
read from a packed file) and where the projections come from. With per-head codes ``C`` and step sizes ``s``:

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
    """What a rule (``vvtq.quant.rules``) reads from a timm attention module: the float parts both passes adopt
    as they are, and the source projections (``linears``: ``{"qkv": fused}`` or ``{"q", "k", "v"}``)."""

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
    rel_pos_keep: tuple[str, ...] = ()

    def position_holder(self) -> nn.Module | None:
        """The source module reduced to its relative-position members (everything else was adopted)."""
        src = self.rel_pos
        if src is not None:
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
        attn = (q * alpha) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        attn = self._fake(quant, attn.softmax(dim=-1))
        return self.attn_drop(attn) @ v

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
        alpha = self.logit_multiplier()
        if integer:
            probs = None if self.attn_quant is None else (lambda p: self._codes(self.attn_quant, p))
            out = int_attention(q, k, v, alpha, bias, probs)
        else:
            out = self._fake_attention(q, k, v, alpha, bias)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(out))
