"""Weight-oscillation tracking and iterative freezing (Nagel et al., *Overcoming Oscillations in
Quantization-Aware Training*, ICML 2022, §3 and §4.2).

Per weight, with integer code ``q_t`` after optimizer step t:

    d_t   = q_t - q_{t-1}
    o_t   = 1  if d_t != 0 and sign(d_t) == -sign(d_tau)   (tau: the last step with a nonzero change), else 0
    f_t   = m * o_t + (1 - m) * f_{t-1}                     (oscillation frequency, m = momentum, f_0 = 0)
    e_t   = m * q_t + (1 - m) * e_{t-1}                     (EMA of the integer value, e_0 = q_0)

A weight "oscillates" when ``f_t > threshold``. With iterative freezing, a weight whose ``f_t`` passes
``freeze_threshold`` is frozen for the rest of training at the integer ``round(e_t)``: its latent value is
set to ``s * round(e_t)`` (plus the offset, if any; s is the current scale), its gradient is zeroed by a
tensor hook on ``module.weight``, and the value is written back after every optimizer step, so weight decay or
Adam momentum cannot move it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["OscillationTracker"]

Pairs = Iterable[tuple[nn.Module, Any]]


def _code_dtype(qmin: int, qmax: int) -> torch.dtype:
    return torch.int8 if qmin >= -128 and qmax <= 127 else torch.int16


class _LayerState:
    """Per-layer state; tensors live on the weight's device."""

    def __init__(self, name: str, module: nn.Module, quantizer: Any) -> None:
        self.name = name
        self.module = module
        self.quantizer = quantizer
        self.numel = module.weight.numel()
        self.code_dtype = _code_dtype(int(quantizer.qmin), int(quantizer.qmax))
        self.prev: Tensor | None = None  # previous integer code
        self.last_sign: Tensor | None = None  # sign of the last nonzero change (int8: -1, 0, +1)
        self.freq: Tensor | None = None  # EMA oscillation frequency
        self.ema: Tensor | None = None  # EMA of the integer code
        self.frozen: Tensor | None = None  # bool mask, allocated at the first freeze
        self.frozen_code: Tensor | None = None
        self.n_frozen = 0
        self.hook: Any = None

    def tensors(self) -> dict[str, Tensor]:
        names = ("prev", "last_sign", "freq", "ema", "frozen", "frozen_code")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class OscillationTracker:
    """Tracks per-weight oscillation frequencies of quantized weights, optionally freezing oscillating ones.

    Args:
        model_or_pairs: a converted model (pairs found with ``vvtq.quant.iter_weight_quantizers``) or an
            iterable of ``(module, quantizer)`` pairs; the quantizer must provide ``codes(w)``, ``qmin``,
            ``qmax``, ``name`` and, for freezing, ``expanded_scale(w)``. Pairs are collected once, here.
        momentum: EMA momentum m (Nagel et al. use 0.01).
        threshold: a weight counts as oscillating when its frequency exceeds this (default 0.005).
        freeze_threshold: if set, freeze weights whose frequency exceeds it (iterative freezing); None = off.
        every: update the statistics on every ``every``-th call of :meth:`step` only (codes are then compared
            ``every`` steps apart); frozen values are re-written on every call regardless.
        dtype: dtype of the frequency and code EMAs (float32 default; float16 halves their memory).

    Call :meth:`step` after each ``optimizer.step()``. The first tracked call only records the codes.
    """

    def __init__(
        self,
        model_or_pairs: nn.Module | Pairs,
        momentum: float = 0.01,
        threshold: float = 0.005,
        freeze_threshold: float | None = None,
        every: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if isinstance(model_or_pairs, nn.Module):
            from vvtq.quant import iter_weight_quantizers  # lazy: keeps this module importable on its own

            model_or_pairs = iter_weight_quantizers(model_or_pairs)
        self.momentum = momentum
        self.threshold = threshold
        self.freeze_threshold = freeze_threshold
        self.every = every
        self.dtype = dtype
        self.calls = 0  # step() calls
        self.updates = 0  # tracked updates (code comparisons)
        self.layers: dict[str, _LayerState] = {}
        for i, (module, q) in enumerate(model_or_pairs):
            name = str(getattr(q, "name", "") or f"layer{i}")
            if name in self.layers:
                name = f"{name}#{i}"
            self.layers[name] = _LayerState(name, module, q)

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def step(self) -> None:
        """Update the statistics from the current weights (and freeze / re-write frozen weights)."""
        self.calls += 1
        for st in self.layers.values():
            if st.n_frozen:
                self._write_frozen(st)
        if (self.calls - 1) % self.every:
            return
        self.updates += 1
        for st in self.layers.values():
            self._update(st)

    def _update(self, st: _LayerState) -> None:
        w = st.module.weight
        code = st.quantizer.codes(w.detach())
        if st.prev is None:
            st.prev = code.to(st.code_dtype)
            st.last_sign = torch.zeros_like(code, dtype=torch.int8)
            st.freq = torch.zeros_like(code, dtype=self.dtype)
            st.ema = code.to(self.dtype)
            return
        m = self.momentum
        sign = torch.sign(code - st.prev).to(torch.int8)  # int32 difference: no overflow
        osc = (sign * st.last_sign) < 0  # changed, opposite to the last change (last_sign 0 → never)
        st.last_sign = torch.where(sign != 0, sign, st.last_sign)
        st.prev = code.to(st.code_dtype)
        st.freq.mul_(1.0 - m).add_(osc.to(self.dtype), alpha=m)
        st.ema.mul_(1.0 - m).add_(code.to(self.dtype), alpha=m)
        if self.freeze_threshold is not None:
            self._freeze_new(st)

    def _freeze_new(self, st: _LayerState) -> None:
        new = st.freq > self.freeze_threshold
        if st.frozen is not None:
            new &= ~st.frozen
        n_new = int(new.sum())
        if n_new == 0:
            return
        if st.frozen is None:
            st.frozen = torch.zeros_like(new)
            st.frozen_code = torch.zeros_like(st.prev)
            self._register_hook(st)
        q = st.quantizer
        target = torch.round(st.ema.float()).clamp_(int(q.qmin), int(q.qmax)).to(st.code_dtype)
        st.frozen_code = torch.where(new, target, st.frozen_code)
        st.prev = torch.where(new, target, st.prev)  # so the jump to the frozen value is not a change
        st.frozen |= new
        st.n_frozen += n_new
        self._write_frozen(st)

    def _register_hook(self, st: _LayerState) -> None:
        if st.hook is None:

            def zero_frozen(grad: Tensor) -> Tensor:
                return grad if st.frozen is None else grad.masked_fill(st.frozen, 0)

            st.hook = st.module.weight.register_hook(zero_frozen)

    def _write_frozen(self, st: _LayerState) -> None:
        w = st.module.weight
        q = st.quantizer
        value = q.expanded_scale(w).detach() * st.frozen_code.to(torch.float32)
        off_fn = getattr(q, "expanded_offset", None)
        offset = off_fn(w) if off_fn is not None else None
        if offset is not None:
            value = value + offset.detach()
        w.data.copy_(torch.where(st.frozen, value.to(w.dtype), w.data))

    def remove_hooks(self) -> None:
        """Remove the gradient hooks (frozen values are then no longer protected)."""
        for st in self.layers.values():
            if st.hook is not None:
                st.hook.remove()
                st.hook = None

    # ------------------------------------------------------------------ reporting
    def fractions(self) -> dict[str, float]:
        """Fraction of oscillating weights (frequency > threshold) per layer, ``"overall"`` (by numel) and
        ``"lowbit"``: over the layers below 8 bits only (the 8-bit ends oscillate little and would dilute it)."""
        out: dict[str, float] = {}
        count, total, low_count, low_total = 0, 0, 0, 0
        for name, st in self.layers.items():
            if st.freq is None:
                continue
            n = int((st.freq > self.threshold).sum())
            out[name] = n / max(st.numel, 1)
            count += n
            total += st.numel
            if int(getattr(st.quantizer, "bits", 0)) < 8:
                low_count, low_total = low_count + n, low_total + st.numel
        out["overall"] = count / total if total else 0.0
        out["lowbit"] = low_count / low_total if low_total else 0.0
        return out

    def frozen_fraction(self) -> float:
        """Fraction of all tracked weights that are frozen."""
        total = sum(st.numel for st in self.layers.values())
        return sum(st.n_frozen for st in self.layers.values()) / total if total else 0.0

    def metrics(self, prefix: str = "osc/") -> dict[str, float]:
        """Flat dict for the JSONL logger: ``{prefix}overall``, ``{prefix}<layer>``, ``{prefix}frozen``."""
        out = {f"{prefix}{k}": v for k, v in self.fractions().items()}
        if self.freeze_threshold is not None:
            out[f"{prefix}frozen"] = self.frozen_fraction()
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The tracker state (tensors and counters), keyed by layer name."""
        return {
            "calls": self.calls,
            "updates": self.updates,
            "momentum": self.momentum,
            "layers": {
                name: {k: t.clone() for k, t in st.tensors().items()} for name, st in self.layers.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; layers are matched by name, and frozen values are re-applied."""
        layers = state["layers"]
        missing = set(self.layers) - set(layers)
        unexpected = set(layers) - set(self.layers)
        if missing or unexpected:
            raise KeyError(
                f"oscillation state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        self.calls = int(state["calls"])
        self.updates = int(state["updates"])
        for name, st in self.layers.items():
            saved = layers[name]
            weight = st.module.weight
            for k in ("prev", "last_sign", "freq", "ema", "frozen", "frozen_code"):
                t = saved.get(k)
                if t is not None:
                    if t.numel() != st.numel:
                        raise ValueError(f"layer {name}: saved '{k}' has {t.numel()} entries, not {st.numel}")
                    t = t.to(weight.device).reshape(weight.shape)
                    if k in ("prev", "frozen_code"):
                        t = t.to(st.code_dtype)
                    elif k in ("freq", "ema"):
                        t = t.to(self.dtype)
                setattr(st, k, t)
            st.n_frozen = int(st.frozen.sum()) if st.frozen is not None else 0
            if st.n_frozen:
                self._register_hook(st)
                with torch.no_grad():
                    self._write_frozen(st)
