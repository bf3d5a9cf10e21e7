"""Mixed-precision weight bit assignment from per-layer sensitivity (VVTQ §1: module-dependent variation).

For every transformer-block weight l (``blocks.i.attn.q``, ..., ``blocks.i.mlp.fc2``) with n_l parameters and
every choice b in ``choices`` (default 2, 3, 4, 8), the sensitivity S_l(b) is the KL divergence to the FP
output when only layer l is quantized to b bits (PTQ, see ``sensitivity.run_sensitivity``). Assuming the costs
add up,
the proposal solves

    minimise  sum_l S_l(b_l)    subject to    sum_l n_l b_l / sum_l n_l  <=  budget

greedily: start every layer at the lowest choice, then repeatedly take the upgrade (l, b_l -> b') with the
largest gain per bit-cost ``(S_l(b_l) - S_l(b')) / (n_l (b' - b_l))`` that keeps the average within the
budget,
until no upgrade with a positive gain fits. The result is written as a ``QuantConfig`` override file
(``{"overrides": {"blocks.3.attn.q": {"wbits": 4}, ...}}``) for ``vvtq train --overrides-file``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..quant import Quantizer, QuantizerError
from ..quant.config import EDGE_KINDS
from .sensitivity import module_groups, run_sensitivity
from .stats import as_analysis_model, site_module

__all__ = ["DEFAULT_CHOICES", "average_bits", "layer_params", "layer_sensitivity", "propose_bits",
           "write_overrides"]

DEFAULT_CHOICES = (2, 3, 4, 8)


def layer_params(model: nn.Module) -> dict[str, int]:
    """``{layer: weight numel}`` for every quantizable transformer-block weight (the edges are excluded)."""
    model = as_analysis_model(model)
    out = {}
    for m in model.modules():
        if isinstance(m, Quantizer) and m.is_weight and m.kind not in EDGE_KINDS:
            layer = site_module(m.name)
            out[layer] = model.get_submodule(layer).weight.numel()
    return out


def layer_sensitivity(model: nn.Module, eval_batches: Sequence, choices: Iterable[int] = DEFAULT_CHOICES,
                      device: torch.device | str = "cpu",
                      known: dict[int, dict[str, float]] | None = None,
                      lossless_from: int | None = 8) -> dict[str, dict[int, float]]:
    """``{layer: {bits: KL}}``: each block weight quantized alone (MSE scales, PTQ) at each choice.
    ``known[b]`` = ``{layer: KL}`` already measured at ``b`` bits is reused; choices of ``lossless_from``
    bits and more are not measured (``propose_bits`` then takes them as KL 0); ``None`` measures all."""
    groups = module_groups(model)
    table: dict[str, dict[int, float]] = {layer: {} for layer in groups}
    known = known or {}
    for b in choices:
        if lossless_from is not None and b >= lossless_from:
            continue
        if b in known and set(groups) <= set(known[b]):
            for layer in groups:
                table[layer][b] = known[b][layer]
            continue
        _ref, results = run_sensitivity(model, eval_batches, groups, bits=b, mode="ptq", device=device)
        for r in results:
            table[r.label][b] = r.kl
    return table


def average_bits(assignment: dict[str, int], params: dict[str, int]) -> float:
    """Parameter-weighted average bit-width ``sum n_l b_l / sum n_l`` over the layers of ``assignment``."""
    total = sum(params[layer] for layer in assignment)
    return sum(params[layer] * b for layer, b in assignment.items()) / max(total, 1)


def propose_bits(sensitivity: dict[str, dict[int, float]], params: dict[str, int], budget: float,
                 choices: Sequence[int] = DEFAULT_CHOICES) -> dict[str, int]:
    """Greedy assignment ``{layer: bits}`` with parameter-weighted average <= ``budget`` (see module doc).

    A layer with a missing choice in ``sensitivity`` gets S = 0 at 8 bits and above, else is not upgraded
    to it.
    """
    choices = sorted(set(choices))
    if budget < choices[0]:
        raise QuantizerError(f"bit budget {budget} is below the smallest choice ({choices[0]} bits)")
    layers = list(sensitivity)
    total = sum(params[layer] for layer in layers)
    assign = {layer: choices[0] for layer in layers}
    spent = sum(params[layer] * choices[0] for layer in layers)
    cap = budget * total + 1e-9 * total

    def cost(layer: str, b: int) -> float | None:
        s = sensitivity[layer].get(b)
        return 0.0 if s is None and b >= 8 else s

    while True:
        best, best_ratio = None, 0.0
        for layer in layers:
            cur = cost(layer, assign[layer])
            if cur is None:
                continue
            for b in choices:
                if b <= assign[layer]:
                    continue
                extra = params[layer] * (b - assign[layer])
                new = cost(layer, b)
                if new is None or spent + extra > cap:
                    continue
                ratio = (cur - new) / extra
                if ratio > best_ratio:
                    best, best_ratio = (layer, b, extra), ratio
        if best is None:
            return assign
        layer, b, extra = best
        assign[layer] = b
        spent += extra


def write_overrides(assignment: dict[str, int], path: str | Path, header: str = "") -> Path:
    """Write ``{"overrides": {layer: {"wbits": b}}}`` as YAML (``header`` lines become ``#`` comments)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump({"overrides": {layer: {"wbits": int(b)} for layer, b in assignment.items()}},
                          sort_keys=False)
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comments + body)
    return path
