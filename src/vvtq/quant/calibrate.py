"""Scale initialisation: ``calibrate(model, batches)`` sets every quantizer's step size before training.

Weights get a per-group MSE fit on the current latent weights. Activation quantizers observe a few training
batches (full precision passes through meanwhile) and fit their step sizes by MSE or the LSQ rule
(docs/METHOD.md §2). Under ``torch.distributed`` the fitted scales and offsets are averaged over ranks, so that every
replica starts from identical quantizers (the reference initialised rank 0 only).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .quantizers import Quantizer, QuantizerError


def iter_quantizers(model: nn.Module) -> Iterator[Quantizer]:
    """Every enabled quantizer of ``model``."""
    for m in model.modules():
        if isinstance(m, Quantizer) and m.enabled:
            yield m


def iter_weight_quantizers(model: nn.Module) -> Iterator[tuple[nn.Module, Quantizer]]:
    """``(layer, quantizer)`` for every layer whose weight is quantized; the latent weight is ``layer.weight``."""
    for m in model.modules():
        q = getattr(m, "weight_quant", None)
        if isinstance(q, Quantizer) and q.enabled:
            yield m, q


def iter_act_quantizers(model: nn.Module) -> Iterator[Quantizer]:
    """Every enabled activation quantizer of ``model``."""
    for q in iter_quantizers(model):
        if not q.is_weight:
            yield q


def set_quantization_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every quantizer of ``model`` on or off (off = floating point), keeping their state."""
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.set_enabled(enabled)
    return model


def _inputs(batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def sync_quantizers(model: nn.Module) -> None:
    """Average every quantizer's scale and offset over the ranks of the default process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for q in iter_quantizers(model):
        for p in (q.scale, q.offset):
            if p is not None:
                dist.all_reduce(p.data, op=dist.ReduceOp.SUM)
                p.data /= world


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable | None = None, num_batches: int | None = None,
              device: torch.device | str | None = None) -> nn.Module:
    """Initialise every enabled quantizer of a converted ``model`` from its weights and a few input batches.

    ``batches`` yields input tensors (or tuples whose first item is the input); ``num_batches`` caps how many
    are used. Returns the model, in the training mode it had.
    """
    if getattr(model, "vvtq_config", None) is None and not any(True for _ in iter_quantizers(model)):
        raise QuantizerError("calibrate() needs a model converted by vvtq.quantize_model")
    for layer, q in iter_weight_quantizers(model):
        q.init_from_tensor(layer.weight)
    acts = list(iter_act_quantizers(model))
    if acts:
        if batches is None:
            raise QuantizerError(f"calibrate() needs input batches for the model's {len(acts)} activation "
                                 "quantizers")
        if device is None:
            device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        for q in acts:
            q.start_observing()
        seen = 0
        try:
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                model(_inputs(batch).to(device))
                seen += 1
            if seen == 0:
                raise QuantizerError("calibrate() got an empty iterable of batches")
            for q in acts:
                q.finish_observing()
        finally:
            for q in acts:
                q._observer = None
            model.train(was_training)
    sync_quantizers(model)
    return model
