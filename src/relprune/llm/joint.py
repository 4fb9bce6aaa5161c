"""Width and depth in one plan: whole decoder blocks, head groups and MLP channels compete for one budget.

Every candidate is valued by the share of the residual stream it writes, so that a unit and a block are on
one scale. A block's value is its relative contribution to the residual stream (``relative`` of
:mod:`~relprune.llm.depth`: ||f(h)|| / (||h|| + ||f(h)||), the mean over tokens); a sublayer's (the attention,
the MLP) is the same share of what it adds to the stream at its own point; a unit's value is its sublayer's
share times the unit's part of its sublayer's unit scores (any of the structured scores, normalised to sum
to one over the sublayer). Candidates are taken cheapest first by value per parameter until the budget is
met: a block whose attention and MLP cancel (it writes less than its sublayers each do) goes whole, a
block whose units matter unevenly loses its weakest units. Each layer keeps at least one unit of each
kind unless the whole block goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..defaults import DEFAULT_LLM_ROUND_TO
from ..errors import RelpruneError
from .blocks import BlockStep, block_outputs, walk_blocks
from .depth import live_tokens, relative_share, remove_blocks
from .sequential import decoder_blocks
from .structured import (
    block_unit_scores,
    check_keep,
    check_ratio,
    check_round_to,
    layer_sizes,
    nothing_removed,
    reader_stats,
    rounded_drop,
    shrink_refit,
    shrink_units,
    unit_compensation,
    unit_cost,
    unit_score,
)


@dataclass(frozen=True)
class ResidualShares:
    """Per decoder block, the share of the residual stream the block, its attention and its MLP write."""

    block: Tensor
    attention: Tensor
    mlp: Tensor


@dataclass(frozen=True)
class JointPlan:
    """Blocks to remove (indices in the model as it is) and, per block that stays (indexed after the
    removal, as :func:`~relprune.llm.structured.shrink_refit` takes them), the units it keeps."""

    drop: list[int]
    keep: dict[tuple[int, str], Tensor]


def _mid_norm(block: nn.Module) -> nn.Module:
    """The norm whose input is the residual stream between the attention and the MLP."""
    for name in ("pre_feedforward_layernorm", "post_attention_layernorm"):
        norm = getattr(block, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise RelpruneError(f"{type(block).__name__} has no norm before its MLP (pre_feedforward_layernorm or "
                        "post_attention_layernorm); the joint plan reads the residual stream there")


def residual_shares(model: nn.Module, batches: Sequence[dict[str, Tensor]], *,
                    blocks: str | Sequence[str] | None = None, progress: bool = False) -> ResidualShares:
    """Each block's (and sublayer's) mean share of the residual stream over the live calibration tokens, on
    the dense model's hidden states: one pass through the blocks."""
    return joint_statistics(model, batches, None, blocks=blocks, progress=progress)[1]


def joint_statistics(model: nn.Module, batches: Sequence[dict[str, Tensor]], criterion: str | None, *,
                     blocks: str | Sequence[str] | None = None, seed: int = 0,
                     progress: bool = False) -> tuple[dict[tuple[int, str], Tensor], ResidualShares]:
    """What :func:`plan_joint` reads, in one pass through the dense blocks: the unit scores under ``criterion``
    (as :func:`~relprune.llm.structured.unit_scores` gives them; None: none) and the residual shares."""
    named = decoder_blocks(model, blocks)
    statistics = () if criterion is None else unit_score(criterion).statistics
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    scores: dict[tuple[int, str], Tensor] = {}
    shares = {k: torch.zeros(len(named), dtype=torch.float64) for k in ("block", "attention", "mlp")}
    for step in walk_blocks(model, named, batches, progress=progress):
        if criterion is not None:
            stats = reader_stats(step.block, step.inputs, statistics) if statistics else None
            scores.update({(step.index, k): v for k, v in block_unit_scores(step.block, stats, criterion, gen).items()})
        for key, value in _block_shares(step).items():
            shares[key][step.index] = value
    return scores, ResidualShares(**shares)


def _block_shares(step: BlockStep) -> dict[str, float]:
    """The step's block, attention and MLP residual shares, its outputs computed (and kept for the walk) once."""
    mids: list[Tensor] = []
    handle = _mid_norm(step.block).register_forward_pre_hook(lambda _m, args, mids=mids: mids.append(args[0]))
    try:
        step.outputs = block_outputs(step.block, step.inputs)
    finally:
        handle.remove()
    if len(mids) != len(step.inputs):
        raise RelpruneError(f"block {step.name} called its pre-MLP norm {len(mids)} times on "
                            f"{len(step.inputs)} batches; the joint plan needs one call per batch")
    sums = dict.fromkeys(("block", "attention", "mlp"), 0.0)
    count = 0
    for h, mid, out, call in zip(step.hidden, mids, step.outputs, step.inputs, strict=True):
        h, mid, out = live_tokens(call.token_mask, h, mid, out)
        sums["block"] += float(relative_share(h, out - h).sum())
        sums["attention"] += float(relative_share(h, mid - h).sum())
        sums["mlp"] += float(relative_share(mid, out - mid).sum())
        count += h.shape[0]
    return {key: total / max(count, 1) for key, total in sums.items()}


def plan_joint(model: nn.Module, scores: dict[tuple[int, str], Tensor], shares: ResidualShares, ratio: float, *,
               blocks: str | Sequence[str] | None = None, round_to: int = DEFAULT_LLM_ROUND_TO) -> JointPlan:
    """The blocks and units to remove so that ``ratio`` of the decoder layers' attention and MLP parameters
    goes, cheapest residual share per parameter first (``scores``: unit scores, larger kept, as
    :func:`~relprune.llm.structured.unit_scores` gives them; ``round_to``: every MLP kept keeps a multiple
    of this many channels, or all, as in :func:`~relprune.llm.structured.plan_units`)."""
    check_ratio(ratio)
    check_round_to(round_to)
    named = decoder_blocks(model, blocks)
    kinds = {"heads": shares.attention, "mlp": shares.mlp}
    missing = [(i, k) for i in range(len(named)) for k in kinds if (i, k) not in scores]
    if missing or any(v.numel() != len(named) for v in (shares.block, *kinds.values())):
        raise RelpruneError(f"scores and shares must cover every block's heads and mlp; missing {missing[:3]}")
    cost = {k: unit_cost(named[k[0]][1], k[1]) for k in scores}
    counts = {k: scores[k].numel() for k in scores}
    step = {k: round_to if k[1] == "mlp" else 1 for k in scores}

    def gone(k: tuple[int, str], d: int) -> int:
        return rounded_drop(counts[k], d, step[k])

    order = {k: torch.argsort(scores[k], stable=True) for k in scores}
    candidates: list[tuple[float, int, tuple[int, str] | int]] = []
    for (i, kind), s in scores.items():
        part = s.double().clamp_min(0) / s.double().clamp_min(0).sum().clamp_min(1e-300)
        for rank, v in enumerate(part[order[i, kind]].tolist()):
            candidates.append((float(kinds[kind][i]) * v / cost[i, kind], rank, (i, kind)))
    for i in range(len(named)):
        block_cost = sum(cost[i, k] * counts[i, k] for k in kinds)
        candidates.append((float(shares.block[i]) / block_cost, 0, i))
    candidates.sort(key=lambda c: (c[0], c[1]))
    target = ratio * sum(cost[k] * counts[k] for k in scores)
    drops = dict.fromkeys(scores, 0)
    dropped: set[int] = set()
    removed = 0.0
    for _, _, what in candidates:
        if removed >= target:
            break
        if isinstance(what, int):
            if len(dropped) + 1 < len(named):
                removed += sum(cost[what, k] * (counts[what, k] - gone((what, k), drops[what, k])) for k in kinds)
                dropped.add(what)
        elif what[0] not in dropped and drops[what] < counts[what] - 1:
            drops[what] += 1
            removed += cost[what] * (gone(what, drops[what]) - gone(what, drops[what] - 1))
    if removed == 0:
        raise nothing_removed(ratio)
    after = {old: new for new, old in enumerate(i for i in range(len(named)) if i not in dropped)}
    keep = {(after[i], kind): torch.sort(order[i, kind][gone((i, kind), drops[i, kind]):]).values
            for (i, kind) in scores if i in after and gone((i, kind), drops[i, kind])}
    return JointPlan(sorted(dropped), keep)


def shrink_joint(model: nn.Module, batches: Sequence[dict[str, Tensor]], plan: JointPlan, *,
                 compensation: str = "refit", blocks: str | Sequence[str] | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Remove the plan's blocks, then its units, in place; what reads removed units is corrected as
    ``llm shrink`` does (``refit``: least squares on the calibration tokens through the model without the
    removed blocks; ``bias``: FLAP's compensation; ``none``). Returns the per-layer sizes and the blocks removed."""
    if compensation not in ("refit", "bias", "none"):
        raise RelpruneError(f"compensation must be 'refit', 'bias' or 'none', got {compensation!r}")
    named = decoder_blocks(model, blocks)
    if any(not 0 <= i < len(named) for i in plan.drop) or len(set(plan.drop)) >= len(named):
        raise RelpruneError(f"the plan removes blocks {plan.drop} of {len(named)}; at least one must stay")
    check_keep([b for i, b in enumerate(named) if i not in set(plan.drop)], plan.keep)
    if plan.drop:
        remove_blocks(model, plan.drop, blocks=blocks)
    if not plan.keep:
        sizes = layer_sizes(model, blocks=blocks)
    elif compensation == "refit":
        sizes = shrink_refit(model, batches, plan.keep, blocks=blocks, progress=progress)
    else:
        delta = unit_compensation(model, batches, plan.keep, blocks=blocks) if compensation == "bias" else None
        sizes = shrink_units(model, plan.keep, blocks=blocks, bias_delta=delta)
    return {**sizes, "removed": list(plan.drop)}
