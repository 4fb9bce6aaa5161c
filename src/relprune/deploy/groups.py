"""Structured pruning over the dependency graph: score channel groups, meet a budget, shrink exactly.

Channels are scored by the registered structured scores (:mod:`relprune.core.units`: ``rc``, ``share``,
``fluctuation``, ``l1``, ``l2``, ``taylor``, ``random``; pair ``fluctuation`` with ``bias_compensation``
as FLAP does). Budgets remove a fraction of the conv and Linear multiply-accumulates
(``budget="flops"``) or of the parameters (``"params"``), either over all groups at once with scores
normalised by their group's mean (``scope="global"``) or the same fraction of channels in every group
(``"uniform"``; ``"layer"`` is its earlier name). The same scores and scopes plan a decoder's attention
heads and MLP channels (:mod:`relprune.llm.structured`), whose groups are read from the architecture.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.checks import real_number
from ..core.stats import Stats
from ..core.units import GROUP_SCORES, GroupScore, member_stats, register_group_score, score_groups
from ..errors import RelpruneError, ShrinkError, StatisticNotCollectedError
from .graph import NORMS, DependencyGraph, Group

#: How a structured budget is spread: over all groups at once on normalised scores, or the same share of each.
STRUCTURED_SCOPES = ("uniform", "global")
#: The built-in channel scores' names (the registry, :data:`GROUP_SCORES`, holds any registered since).
GROUP_CRITERIA = ("rc", "share", "fluctuation", "l1", "l2", "taylor", "random")


def group_scores(graph: DependencyGraph, stats: Stats | None = None, criterion: str = "l2",
                 seed: int = 0) -> dict[int, Tensor]:
    """Per prunable group (by index in ``graph.groups``), one score per channel (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return score_groups(graph.groups, graph.modules, stats, criterion, gen)


@dataclass
class Plan:
    """Indices of the channels each prunable group keeps, with the cost before and after."""

    keep: dict[int, Tensor]
    flops: tuple[int, int]
    params: tuple[int, int]


def cost(graph: DependencyGraph, keep: dict[int, Tensor] | None = None) -> tuple[int, int]:
    """(multiply-accumulates per sample, parameters) of the conv/Linear/norm layers if ``keep`` were applied."""
    kept_rows, kept_cols = _slices(graph, keep or {})
    rows = {n: len(i) for n, i in kept_rows.items()}
    cols = {n: len(i) for n, i in kept_cols.items()}
    flops = params = 0
    for name, module in graph.modules.items():
        if name not in graph.spatial and not isinstance(module, NORMS):
            continue
        if isinstance(module, NORMS):
            n = rows.get(name, module.num_features)
            params += 2 * n if module.affine else 0
            continue
        w = module.weight
        kernel = math.prod(w.shape[2:]) if w.dim() > 2 else 1
        o = rows.get(name, w.shape[0])
        i = cols.get(name, w.shape[1])
        macs = o * i * kernel
        flops += macs * graph.spatial[name]
        params += macs + (o if module.bias is not None else 0)
    return flops, params


def plan(graph: DependencyGraph, scores: dict[int, Tensor], ratio: float, *, budget: str = "flops",
         scope: str = "global", round_to: int = 1) -> Plan:
    """Which channels to keep so that ``ratio`` of the FLOPs (or parameters) goes; at least one per group.

    ``round_to``: every group keeps a multiple of this many units (or all of them), the widths CPU
    and GPU kernels vectorise well (Torch-Pruning's ``round_to``)."""
    if not 0.0 <= real_number(ratio, "ratio", RelpruneError) < 1.0:
        raise RelpruneError(f"ratio must be in [0, 1), got {ratio}")
    if budget not in ("flops", "params"):
        raise RelpruneError(f"budget must be 'flops' or 'params', got {budget!r}")
    if scope not in (*STRUCTURED_SCOPES, "layer"):
        raise RelpruneError(f"scope must be one of {STRUCTURED_SCOPES}, got {scope!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise RelpruneError(f"round_to must be a positive int, got {round_to!r}")
    if not scores:
        raise ShrinkError("no channel group can be pruned: " + "; ".join(
            f"{g.describe()}: {g.reason}" for g in graph.groups[:3]))
    which = 0 if budget == "flops" else 1
    before = cost(graph)
    target = before[which] * (1 - ratio)
    order = {gi: torch.argsort(s, stable=True) for gi, s in scores.items()}
    normed = {gi: s / s.mean().clamp_min(1e-300) for gi, s in scores.items()}

    def keep_for(t: float) -> dict[int, Tensor]:
        out = {}
        for gi, s in scores.items():
            n = s.numel()
            if scope == "global":
                drop = min(int((normed[gi] <= t).sum()), n - 1)
            else:
                drop = min(math.floor(t * n), n - 1)
            kept = min(n, -(-(n - drop) // round_to) * round_to)
            out[gi] = torch.sort(order[gi][n - kept:]).values
        return out

    lo, hi = 0.0, (max(float(v.max()) for v in normed.values()) * 1.01 + 1e-12) if scope == "global" else 1.0
    best = keep_for(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        k = keep_for(mid)
        if cost(graph, k)[which] <= target:
            hi, best = mid, k
        else:
            lo = mid
    if cost(graph, best)[which] > target:
        best = keep_for(hi)
    after = cost(graph, best)
    return Plan(best, (before[0], after[0]), (before[1], after[1]))


def _slices(graph: DependencyGraph, keep: dict[int, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rows (or per-channel entries) and input columns each touched module keeps, as sorted indices."""
    row_masks: dict[str, Tensor] = {}
    col_masks: dict[str, Tensor] = {}
    for gi, group in enumerate(graph.groups):
        kept = keep.get(gi)
        if kept is None or len(kept) == group.size:
            continue
        block = torch.zeros(group.size, dtype=torch.bool)
        block[kept] = True
        for m in group.members:
            module = graph.modules[m.module]
            if m.role == "in":
                mask = col_masks.setdefault(m.module, torch.ones(module.weight.shape[1], dtype=torch.bool))
            else:
                size = module.num_features if isinstance(module, NORMS) else module.weight.shape[0]
                mask = row_masks.setdefault(m.module, torch.ones(size, dtype=torch.bool))
            idx = m.index(group.size)
            mask[idx] = block.view(-1, 1).expand_as(idx)
    rows = {n: torch.nonzero(m).flatten() for n, m in row_masks.items()}
    cols = {n: torch.nonzero(m).flatten() for n, m in col_masks.items()}
    return rows, cols


def structured_masks(graph: DependencyGraph, keep: dict[int, Tensor]) -> dict[str, Tensor]:
    """Keep-masks (weight-shaped) that zero every removed row and input column: the masked form."""
    rows, cols = _slices(graph, keep)
    masks = {}
    for name in set(rows) | set(cols):
        module = graph.modules[name]
        if isinstance(module, NORMS):
            continue
        w = module.weight
        mask = torch.ones_like(w, dtype=torch.bool)
        if name in rows:
            r = torch.zeros(w.shape[0], dtype=torch.bool)
            r[rows[name]] = True
            mask &= r.reshape(-1, *([1] * (w.dim() - 1)))
        if name in cols:
            c = torch.zeros(w.shape[1], dtype=torch.bool)
            c[cols[name]] = True
            mask &= c.reshape(1, -1, *([1] * (w.dim() - 2)))
        masks[name] = mask
    return masks


def compensation_bias(graph: DependencyGraph, keep: dict[int, Tensor], stats: Stats) -> dict[str, Tensor]:
    """Per consumer, the mean contribution of its removed input columns (added to its bias, as FLAP does)."""
    _, cols = _slices(graph, keep)
    out = {}
    for name, kept in cols.items():
        s = member_stats(stats, name, "fluctuation")
        cm = s.contribution_mean
        cm = cm.reshape(cm.shape[0], cm.shape[1], -1).sum(2) if cm.dim() > 2 else cm
        cm = cm.expand(graph.modules[name].weight.shape[0], -1) if cm.shape[0] == 1 else cm
        removed = torch.ones(cm.shape[1], dtype=torch.bool)
        removed[kept] = False
        out[name] = cm[:, removed].sum(1)
    return out


def shrink_groups(model: nn.Module, graph: DependencyGraph, keep: dict[int, Tensor],
                  bias_delta: dict[str, Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` whose layers hold only the kept channels (the original is untouched)."""
    rows, cols = _slices(graph, keep)
    small = copy.deepcopy(model)
    modules = dict(small.named_modules())
    with torch.no_grad():
        for name, delta in (bias_delta or {}).items():
            layer = modules[name]
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
            layer.bias.add_(delta.to(layer.bias.dtype))
        for name in set(rows) | set(cols):
            _resize(modules[name], rows.get(name), cols.get(name))
    return small


def _resize(module: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
    if isinstance(module, NORMS):
        idx = rows
        for attr in ("weight", "bias"):
            p = getattr(module, attr)
            if p is not None:
                setattr(module, attr, nn.Parameter(p.detach()[idx].clone()))
        for attr in ("running_mean", "running_var"):
            b = getattr(module, attr)
            if b is not None:
                setattr(module, attr, b[idx].clone())
        module.num_features = len(idx)
        return
    w = module.weight.detach()
    groups = getattr(module, "groups", 1)
    depthwise = groups > 1 and groups == module.in_channels == module.out_channels
    if rows is not None:
        w = w[rows]
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach()[rows].clone())
    if cols is not None and not depthwise:
        w = w[:, cols]
    module.weight = nn.Parameter(w.clone())
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    else:
        module.out_channels = w.shape[0]
        module.in_channels = w.shape[0] if depthwise else w.shape[1] * module.groups
        if depthwise:
            module.groups = w.shape[0]


@dataclass
class StructuredResult:
    """What :func:`prune_groups` did: the smaller model, the plan, and the groups it left alone."""

    model: nn.Module
    plan: Plan
    refused: list[tuple[str, str]]


def prune_groups(model: nn.Module, example: Tensor, ratio: float, *, criterion: str = "l2",
                 stats: Stats | None = None, budget: str = "flops", scope: str = "global",
                 bias_compensation: bool = False, seed: int = 0, round_to: int = 1,
                 leaves: tuple[str, ...] = ()) -> StructuredResult:
    """Trace, score, plan and shrink in one call; ``model`` itself is left unchanged."""
    real_number(ratio, "ratio", RelpruneError)  # before the trace
    graph = DependencyGraph(model, example, leaves=leaves)
    scores = group_scores(graph, stats, criterion, seed)
    p = plan(graph, scores, ratio, budget=budget, scope=scope, round_to=round_to)
    if bias_compensation and stats is None:
        raise StatisticNotCollectedError("bias_compensation needs statistics with 'contribution_mean'")
    delta = compensation_bias(graph, p.keep, stats) if bias_compensation else None
    small = shrink_groups(model, graph, p.keep, delta)
    refused = [(g.describe(), g.reason) for g in graph.groups if not g.prunable]
    return StructuredResult(small, p, refused)


__all__ = ["GROUP_CRITERIA", "GROUP_SCORES", "STRUCTURED_SCOPES", "Group", "GroupScore", "Plan", "StructuredResult",
           "compensation_bias", "cost", "group_scores", "plan", "prune_groups", "register_group_score", "shrink_groups",
           "structured_masks"]
