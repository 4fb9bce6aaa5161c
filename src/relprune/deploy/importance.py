"""How much each neuron matters to the model's output, propagated back through relative contributions.

A neuron of the last layer has importance 1. A neuron j further down passes on what its consumers
receive from it: I_j = sum_i I_i E[r_ij], summed over every layer that reads it, where E[r_ij] is
the mean share of consumer i's input that j carries (the ``relative_mean`` statistic). The shares
of a neuron sum to one, so importance is conserved from layer to layer, like a relevance flow, and
a weight's share of its neuron times that neuron's importance (criterion ``rc-flow``) is on one
scale across layers. The channel dependency graph says who reads whom (branches, concatenations,
flattens, grouped convolutions); a residual stream, whose channels the graph unites before and
after each block, is refused by name.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..core.stats import Stats
from ..errors import ShrinkError, StatisticNotCollectedError
from .graph import OUTPUT_REASON, DependencyGraph, Member


def output_importance(model: nn.Module, stats: Stats, example: Tensor, *,
                      leaves: Iterable[str] = ()) -> dict[str, Tensor]:
    """Per prunable layer the graph follows, the importance of each of its outputs (float64, (O,))."""
    graph = DependencyGraph(model, example, leaves=leaves)
    producers: dict[str, tuple[int, Member]] = {}
    for gi, group in enumerate(graph.groups):
        for m in group.members:
            if m.role in ("out", "depthwise"):
                producers[m.module] = (gi, m)
    memo: dict[int, Tensor] = {}
    pending: set[int] = set()

    def of_group(gi: int) -> Tensor:
        if gi in memo:
            return memo[gi]
        group = graph.groups[gi]
        if gi in pending:
            # A residual add unites a stream's channels before and after a branch: one importance
            # per channel would have to be both what enters the branch and what leaves it.
            raise ShrinkError(f"output importance cannot follow {group.describe()}: a residual add feeds them "
                              "back into themselves (chains, branches and concatenations only)")
        pending.add(gi)
        other = [why for why in dict.fromkeys(group.refusals) if why != OUTPUT_REASON]
        if other:
            raise ShrinkError(f"output importance cannot follow {group.describe()}: {'; '.join(other)}")
        imp = torch.full((group.size,), float(OUTPUT_REASON in group.refusals), dtype=torch.float64)
        for m in group.members:
            if m.role != "in":
                continue
            if m.module not in stats or "relative_mean" not in stats[m.module].statistics:
                raise StatisticNotCollectedError(
                    f"output importance needs the 'relative_mean' statistic of {m.module!r}; collect it with "
                    "collect_stats")
            share = stats[m.module].relative_mean.double()
            share = share.reshape(share.shape[0], share.shape[1], -1).sum(2)
            flow = of_module(m.module) @ share  # what each input column passes on
            imp += flow[m.index(group.size)].sum(1)
        pending.discard(gi)
        memo[gi] = imp
        return imp

    def of_module(name: str) -> Tensor:
        gi, m = producers[name]
        group_imp = of_group(gi)
        rows = torch.zeros(graph.modules[name].weight.shape[0], dtype=torch.float64)
        idx = m.index(graph.groups[gi].size)
        rows[idx] = group_imp.view(-1, 1).expand_as(idx)
        return rows

    return {name: of_module(name) for name in producers if name in stats}


__all__ = ["output_importance"]
