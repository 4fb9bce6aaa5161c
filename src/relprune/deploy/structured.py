"""Structured pruning: remove whole neurons and channels, scored by what they contribute downstream.

A unit's score is its total relative contribution to the next prunable layer:
the sum, over the next layer's weights that read it, of E[r] + k Std[r]
(with k = ``ucb_k``; 0 gives the plain mean). The baseline is L1-norm
channel pruning (Li et al., 2017): the L1 norm of the unit's incoming
weights. Pruning a unit masks its incoming row and every outgoing column, so
:func:`relprune.shrink.shrink` then removes it exactly.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from ..core.allocation import check_sparsity
from ..core.masks import apply_masks, current_masks
from ..core.stats import Stats
from ..errors import RelpruneError, StatsMismatchError
from .shrink import flatten_chain

STRUCTURED_CRITERIA = ("rc", "l1")


def unit_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, next prunable layer) for each prunable layer of a chain but the last."""
    chain = flatten_chain(model)
    names = [n for n, m in chain if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    return list(itertools.pairwise(names))


def _per_unit(values: Tensor, units: int) -> Tensor:
    """Sum a next-layer weight-shaped tensor over everything but the columns each unit feeds."""
    cols = values.reshape(values.shape[0], -1) if values.dim() == 2 else values.sum(tuple(range(2, values.dim())))
    width = cols.shape[1]
    if width % units:
        raise RelpruneError(f"cannot map {width} inputs onto {units} units")
    return cols.reshape(cols.shape[0], units, width // units).sum((0, 2))


def unit_scores(model: nn.Module, stats: Stats | None, criterion: str = "rc", ucb_k: float = 0.0) -> dict[str, Tensor]:
    """Score of every unit of every prunable layer that has a next layer (larger is kept)."""
    if criterion not in STRUCTURED_CRITERIA:
        raise RelpruneError(f"structured criterion must be one of {STRUCTURED_CRITERIA}, got {criterion!r}")
    modules = dict(model.named_modules())
    scores = {}
    for name, nxt in unit_pairs(model):
        layer = modules[name]
        units = layer.weight.shape[0]
        if criterion == "l1":
            scores[name] = layer.weight.detach().abs().reshape(units, -1).sum(1).double()
            continue
        if stats is None or nxt not in stats:
            raise StatsMismatchError(f"structured 'rc' needs statistics of layer {nxt!r}")
        s = stats[nxt]
        value = s.relative_mean + (ucb_k * s.relative_std if ucb_k else 0)
        scores[name] = _per_unit(value, units)
    return scores


def prune_units(model: nn.Module, stats: Stats | None, fraction: float, *, criterion: str = "rc",
                ucb_k: float = 0.0) -> dict[str, Tensor]:
    """Remove ``round(fraction * units)`` units from every layer but the last; returns keep-vectors.

    Masks are applied as with :func:`relprune.prune` (held through training).
    """
    fraction = check_sparsity(fraction)
    scores = unit_scores(model, stats, criterion, ucb_k)
    modules = dict(model.named_modules())
    keep_units = {}
    for name, score in scores.items():
        k = round(fraction * score.numel())
        keep = torch.ones(score.numel(), dtype=torch.bool)
        if k:
            keep[torch.sort(score, stable=True).indices[:k]] = False
        keep_units[name] = keep
    old = current_masks(model)
    new = {}
    for name, nxt in unit_pairs(model):
        keep = keep_units[name]
        rows = old[name].clone()
        rows[~keep] = False
        new[name] = rows & new.get(name, old[name])
        w_next = modules[nxt].weight
        per = w_next.shape[1] // keep.numel()
        cols = keep.repeat_interleave(per).to(w_next.device)
        view = cols.reshape(1, -1, *([1] * (w_next.dim() - 2)))
        new[nxt] = new.get(nxt, old[nxt]) & view
    apply_masks(model, new)
    return keep_units
