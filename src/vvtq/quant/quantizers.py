"""Quantizer modules: one learned-step-size (LSQ) quantizer per tensor site, for weights or activations.

A quantizer owns its maths and its state: step sizes (one per group), an optional learned offset, its
bit-width and an "initialised" flag, all in ``state_dict``. Groups are the whole tensor, each output channel,
or each attention head (a contiguous block of rows or columns) along one axis. See docs/METHOD.md §2 and
Esser et al., ICLR 2020 (LSQ); Bhalgat et al., CVPRW 2020 (LSQ+) for the learned offset.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import VVTQError
from .fake_quant import int_range, lsq_fake_quant, quant_codes
from .intmath import QT, QWeight, quantize

VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 32)
GRANULARITIES = ("tensor", "channel", "head")
GRAD_SCALE_MODES = ("lsq", "reference", "none")
INIT_METHODS = ("mse", "lsq")
_MIN_SCALE = 1e-8
_SAMPLES_PER_GROUP = 1 << 16  # calibration values kept per group and batch for the MSE fit


class QuantizerError(VVTQError, ValueError):
    """A quantizer was built, loaded or used in a way that cannot give a correct result."""


def check_bits(bits: int, what: str = "bit-width") -> int:
    """Return ``bits`` if it is a supported bit-width (2..8, or 32 for "off"), else raise ``QuantizerError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise QuantizerError(f"{what} must be an integer in 2..8, or 32 to switch quantization off; got {bits!r}")
    return bits


def mse_fit_scale(v: Tensor, qmin: int, qmax: int, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Least-squares step size per row of ``v`` ([G, n]) by alternating rounding and refitting (docs/METHOD.md §2).

    Starts at ``s = max|v| / Qp`` and repeats ``q = clamp(round(v/s)); s = <v,q>/<q,q>``; each row stops once
    its relative change is below ``tol``, and all stop after ``max_iter`` rounds. Vectorised over rows.
    """
    v = v.float()
    s = (v.abs().amax(dim=1) / qmax).clamp_min(_MIN_SCALE)
    active = torch.arange(v.shape[0])
    va, sa = v, s.clone()
    for _ in range(max_iter):
        q = torch.div(va, sa[:, None]).round_().clamp_(qmin, qmax)  # one buffer, in place
        qq = torch.linalg.vecdot(q, q)  # fused multiply-and-sum, no temporaries
        s_new = torch.where(qq > 0, torch.linalg.vecdot(va, q) / qq.clamp_min(1e-12), sa).clamp_min(_MIN_SCALE)
        moving = (s_new - sa).abs() / sa >= tol
        s[active] = s_new
        if not bool(moving.any()):
            break
        if not bool(moving.all()):  # drop the rows that have converged
            active, va, s_new = active[moving], va[moving], s_new[moving]
        sa = s_new
    return s


class _Observer:
    """Streaming statistics of an activation during calibration: sum|x|, count, min, and a value sample."""

    def __init__(self, num_groups: int):
        self.abs_sum = torch.zeros(num_groups, dtype=torch.float64)
        self.count = 0
        self.minimum = torch.full((num_groups,), math.inf)
        self.samples: list[Tensor] = []
        self.gen = torch.Generator().manual_seed(0)

    def update(self, rows: Tensor) -> None:
        rows = rows.detach().float().cpu()
        self.abs_sum += rows.abs().sum(dim=1).double()
        self.count += rows.shape[1]
        self.minimum = torch.minimum(self.minimum, rows.amin(dim=1))
        if rows.shape[1] > _SAMPLES_PER_GROUP:
            idx = torch.randperm(rows.shape[1], generator=self.gen)[:_SAMPLES_PER_GROUP]
            rows = rows[:, idx]
        self.samples.append(rows)


class Quantizer(nn.Module):
    """LSQ fake quantizer for one tensor site.

    Args:
        bits: 2..8, or 32 for "off" (identity).
        signed: signed range ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        granularity: ``"tensor"``, ``"channel"`` (one scale per index of ``axis``) or ``"head"``
            (``num_groups`` contiguous blocks along ``axis``).
        axis: the grouped axis of the tensor this quantizer sees.
        size: the length of ``axis`` (needed for ``channel`` and ``head``).
        num_groups: the number of heads, for ``head``.
        learn_offset: learn an offset beta: ``x_hat = s * clamp(round((x - beta)/s)) + beta``.
        is_weight: weight or activation (changes the gradient scale and the initialisation).
        grad_scale_mode: ``"lsq"`` (1/sqrt(N*Qp)), ``"reference"`` (weights 1/sqrt(sum|W|*Qp), activations
            1/(sqrt(N)*Qp)) or ``"none"``.
        init_method: activation initialisation, ``"mse"`` or ``"lsq"`` (2*mean|x|/sqrt(Qp)). Weights use MSE.
        name, kind: where the quantizer sits (for messages and analysis).
    """

    def __init__(
        self,
        bits: int,
        *,
        signed: bool = True,
        granularity: str = "tensor",
        axis: int = 0,
        size: int | None = None,
        num_groups: int | None = None,
        learn_offset: bool = False,
        is_weight: bool = False,
        grad_scale_mode: str = "lsq",
        init_method: str = "mse",
        name: str = "",
        kind: str = "",
    ):
        super().__init__()
        self.name, self.kind = name, kind
        where = f" (quantizer '{name}')" if name else ""
        self.bits = check_bits(bits, f"bit-width{where}")
        if granularity not in GRANULARITIES:
            raise QuantizerError(f"granularity must be one of {GRANULARITIES}{where}; got {granularity!r}")
        if grad_scale_mode not in GRAD_SCALE_MODES:
            raise QuantizerError(f"grad_scale_mode must be one of {GRAD_SCALE_MODES}; got {grad_scale_mode!r}")
        if init_method not in INIT_METHODS:
            raise QuantizerError(f"init_method must be one of {INIT_METHODS}; got {init_method!r}")
        if granularity == "tensor":
            groups = 1
        elif size is None:
            raise QuantizerError(f"granularity {granularity!r} needs the size of axis {axis}{where}")
        elif granularity == "channel":
            groups = size
        else:
            if not num_groups or size % num_groups:
                raise QuantizerError(
                    f"per-head quantization needs the head count to divide the width{where}: "
                    f"{size} channels, {num_groups} heads"
                )
            groups = num_groups
        self.signed, self.granularity, self.axis, self.num_groups = signed, granularity, axis, groups
        self.is_weight, self.grad_scale_mode, self.init_method = is_weight, grad_scale_mode, init_method
        self.qmin, self.qmax = int_range(min(self.bits, 16), signed)
        active = self.bits < 32
        self.scale = nn.Parameter(torch.ones(groups), requires_grad=active)
        self.offset = nn.Parameter(torch.zeros(groups), requires_grad=active) if learn_offset else None
        self.register_buffer("qbits", torch.tensor(self.bits, dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(False))
        self._switched_off = False
        self._init_checked = False
        self._observer: _Observer | None = None

    # ---------------------------------------------------------------- state
    @property
    def enabled(self) -> bool:
        return self.bits < 32 and not self._switched_off

    def set_enabled(self, flag: bool) -> None:
        """Switch fake quantization on or off at run time (off = identity); the state is kept."""
        self._switched_off = not flag

    def extra_repr(self) -> str:
        sign = "signed" if self.signed else "unsigned"
        off = ", offset" if self.offset is not None else ""
        return f"{self.kind or 'site'}, {self.bits}-bit {sign}, {self.granularity} x{self.num_groups}{off}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._init_checked = False
        where = prefix[:-1] or "quantizer"
        saved_bits = state_dict.get(prefix + "qbits")
        if saved_bits is not None and int(saved_bits) != self.bits:
            error_msgs.append(
                f"{where}: the checkpoint was saved with {int(saved_bits)}-bit quantization here, but this "
                f"model is configured for {self.bits} bits; build the model with the checkpoint's QuantConfig"
            )
        saved_scale = state_dict.get(prefix + "scale")
        if saved_scale is not None and saved_scale.shape != self.scale.shape:
            error_msgs.append(
                f"{where}: the checkpoint has {saved_scale.numel()} scale(s) here, this model {self.num_groups} "
                f"({self.granularity}); the granularity of the two quantization configs differs"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---------------------------------------------------------------- shapes
    def _grouped_axis(self, x: Tensor) -> int:
        ax = self.axis % x.ndim
        if x.shape[ax] % self.num_groups:
            raise QuantizerError(
                f"quantizer '{self.name}' has {self.num_groups} groups along axis {self.axis}, "
                f"but the tensor has shape {tuple(x.shape)}"
            )
        return ax

    def _expand(self, p: Tensor, x: Tensor) -> Tensor:
        if self.num_groups == 1:
            return p.reshape(())
        ax = self._grouped_axis(x)
        width = x.shape[ax]
        if width != self.num_groups:
            p = p.repeat_interleave(width // self.num_groups)
        shape = [1] * x.ndim
        shape[ax] = width
        return p.view(shape)

    def expanded_scale(self, x: Tensor) -> Tensor:
        """The step size(s), clamped positive, broadcastable to ``x``; differentiable w.r.t. ``self.scale``.

        The clamp passes its gradient straight through: an optimiser step that pushes a step size below zero (AdamW
        moves a parameter by about the lr whatever its size, and 8-bit or per-channel steps are ~1e-3) leaves the
        group quantized at the floor, and the gradient brings it back. A plain clamp has zero gradient there: the
        step stays dead and the group's weights round to 0 for the rest of the run.
        """
        floor = self.scale.detach().clamp_min(_MIN_SCALE)
        return self._expand(floor + (self.scale - self.scale.detach()), x)

    def expanded_offset(self, x: Tensor) -> Tensor | None:
        return None if self.offset is None else self._expand(self.offset, x)

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as [G, n]: one row per group."""
        if self.num_groups == 1:
            return x.reshape(1, -1)
        ax = self._grouped_axis(x)
        return x.movedim(ax, 0).reshape(self.num_groups, -1)

    # ---------------------------------------------------------------- maths
    def grad_scale(self, x: Tensor) -> float | Tensor:
        """The factor g on the step-size gradient (LSQ §2.2), per the configured mode."""
        if self.grad_scale_mode == "none":
            return 1.0
        per_group = x.numel() / self.num_groups
        if self.grad_scale_mode == "lsq":
            n = per_group if self.is_weight else per_group / max(x.shape[0], 1)
            return 1.0 / math.sqrt(max(n, 1.0) * self.qmax)
        if self.is_weight:  # reference: 1 / sqrt(sum|W| * Qp)
            return torch.rsqrt(x.detach().abs().sum().float().clamp_min(1e-12) * self.qmax)
        return 1.0 / (math.sqrt(per_group) * self.qmax)

    def codes(self, x: Tensor) -> Tensor:
        """Integer codes ``clamp(round((x - beta)/s), Qn, Qp)`` (int32, no gradient)."""
        return quant_codes(x, self.expanded_scale(x), self.qmin, self.qmax, self.expanded_offset(x))

    def _check_initialized(self) -> None:
        if not self._init_checked:
            if not bool(self.initialized):
                raise QuantizerError(
                    f"quantizer '{self.name or self.kind}' was used before its scale was initialised: "
                    "run vvtq.calibrate(model, batches) after quantize_model, or load a calibrated checkpoint"
                )
            self._init_checked = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self._observer is not None:
            self._observer.update(self._rows(x))
            return x
        self._check_initialized()
        return lsq_fake_quant(x, self.expanded_scale(x), self.qmin, self.qmax, self.grad_scale(x),
                              self.expanded_offset(x))

    # ---------------------------------------------------------------- integer domain (evaluation)
    def integer_ready(self) -> bool:
        """Whether layers may take this site's codes directly (``quantize`` / ``quantize_weight``) instead of
        calling it: not while it calibrates, nor while a hook watches its forward (statistics collection)."""
        return self._observer is None and not self._forward_hooks and not self._forward_pre_hooks

    def quantize(self, x: Tensor) -> QT | Tensor:
        """The activation as codes and scales (``vvtq.quant.intmath.QT``), no gradient; ``x`` itself when off."""
        if not self.enabled:
            return x
        self._check_initialized()
        offset = None if self.offset is None else self.offset.detach()
        return quantize(x.detach(), self.scale.detach().clamp_min(_MIN_SCALE), offset, self.axis,
                        self.num_groups, self.qmin, self.qmax)

    def quantize_weight(self, w: Tensor) -> QWeight | Tensor:
        """The weight as codes (exactly the training codes, ``codes``) and split scales; ``w`` itself when off."""
        if not self.enabled:
            return w
        self._check_initialized()
        return QWeight(self.codes(w).to(w.dtype), self.scale.detach().clamp_min(_MIN_SCALE), self.axis,
                       self.num_groups, max(-self.qmin, self.qmax))

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_from_tensor(self, x: Tensor) -> None:
        """Initialise the step size(s) from a tensor (a weight): MSE fit per group, offset at the minimum."""
        self._set_from_rows(self._rows(x.detach()), method="mse")

    def start_observing(self) -> None:
        self._observer = _Observer(self.num_groups)

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Fit the step size(s) to the values seen since ``start_observing``."""
        obs, self._observer = self._observer, None
        if obs is None or obs.count == 0:
            raise QuantizerError(f"quantizer '{self.name}' saw no data during calibration")
        rows = torch.cat(obs.samples, dim=1)
        self._set_from_rows(rows, method=self.init_method, mean_abs=obs.abs_sum / obs.count, minimum=obs.minimum)

    def _set_from_rows(self, rows: Tensor, method: str, mean_abs: Tensor | None = None,
                       minimum: Tensor | None = None) -> None:
        rows = rows.float().cpu()
        if self.offset is not None:
            beta = (rows.amin(dim=1) if minimum is None else minimum).clamp(max=0.0)
            self.offset.copy_(beta)
            rows = rows - beta[:, None]
            mean_abs = rows.abs().mean(dim=1)
        if method == "lsq":
            if mean_abs is None:
                mean_abs = rows.abs().mean(dim=1)
            s = (2.0 * mean_abs.float() / math.sqrt(self.qmax)).clamp_min(_MIN_SCALE)
        else:
            s = mse_fit_scale(rows, self.qmin, self.qmax)
        self.scale.copy_(s.to(self.scale.device))
        self.initialized.fill_(True)
        self._init_checked = False
