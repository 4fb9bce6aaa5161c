"""Turning scores into keep-masks: global, per-layer and per-row budgets, N:M groups, thresholds.

Scores are compared as O x I matrices. Weights already pruned carry a score
of -inf, so they are the first to go and are never revived. Each budget is
met exactly: ``floor(sparsity * count + 1/2)`` weights are removed per group (halves round
up, the same way for every group size), ties broken by position.

N:M groups are M consecutive inputs of a row; for a convolution, M consecutive input channels
at the same kernel position, the layout sparse kernels (e.g. 2:4 tensor cores) expect.
"""

from __future__ import annotations

import heapq
import itertools
import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import SparsityError
from .checks import real_number
from .layers import weight_matrix

SCOPES = ("global", "layer", "row")


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1), or a clear error."""
    try:
        value = real_number(sparsity, "sparsity")
    except SparsityError:
        raise SparsityError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise SparsityError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return value


def parse_n_m(n_m: str | tuple[int, int]) -> tuple[int, int]:
    """'2:4' or (2, 4) -> (2, 4): keep N of every M consecutive inputs (whole numbers only)."""
    try:
        parts = n_m.split(":") if isinstance(n_m, str) else list(n_m)  # type: ignore[arg-type]
        if not isinstance(n_m, str) and not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                for v in parts):
            raise ValueError
        n, m = (int(v) for v in parts)
    except (TypeError, ValueError):
        raise SparsityError(f"N:M pattern must be two whole numbers, like '2:4' or (2, 4), got {n_m!r}") from None
    if not (0 < n < m):
        raise SparsityError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    return n, m


def _drop_lowest(scores: Tensor, count: int) -> Tensor:
    """Keep-mask of a 1-D score vector with its ``count`` lowest entries removed (stable)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        order = torch.sort(scores, stable=True).indices
        keep[order[:count]] = False
    return keep


def _drop_lowest_rows(scores: Tensor, count: int) -> Tensor:
    """Per row of a 2-D score matrix, remove the ``count`` lowest (stable)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
        keep.scatter_(1, order, False)
    return keep


def removal_count(sparsity: float, count: int) -> int:
    """How many of ``count`` weights a budget of ``sparsity`` removes: the nearest integer, halves up.

    Python's ``round`` rounds halves to even, so at 0.5 a row of 5 would lose 2 and a row of 7
    would lose 4; this keeps every group size on the same side.
    """
    return math.floor(sparsity * count + 0.5)


def nm_groups(t: Tensor, m: int) -> Tensor:
    """A weight-shaped tensor as rows of M: consecutive inputs (Linear), or M consecutive input
    channels at one kernel position (conv: (O, C, *k) is regrouped as (O, *k, C))."""
    if t.dim() > 2:
        t = t.movedim(1, -1)
    return t.reshape(-1, m)


def from_nm_groups(groups: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`nm_groups`."""
    if len(shape) > 2:
        moved = (shape[0], *shape[2:], shape[1])
        return groups.reshape(moved).movedim(-1, 1)
    return groups.reshape(shape)


def allocate(scores: Mapping[str, Tensor], sparsity: float, scope: str = "global") -> dict[str, Tensor]:
    """Keep-masks meeting ``sparsity`` under ``scope`` ('global', 'layer' or 'row')."""
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise SparsityError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global":
        flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
        keep = _drop_lowest(flat, removal_count(sparsity, flat.numel()))
        out, start = {}, 0
        for name, s in scores.items():
            out[name] = keep[start:start + s.numel()].reshape(s.shape)
            start += s.numel()
        return out
    if scope == "layer":
        return {n: _drop_lowest(s.reshape(-1), removal_count(sparsity, s.numel())).reshape(s.shape)
                for n, s in scores.items()}
    out = {}
    for n, s in scores.items():
        rows = weight_matrix(s)
        out[n] = _drop_lowest_rows(rows, removal_count(sparsity, rows.shape[1])).reshape(s.shape)
    return out


def nm_fits(shape: torch.Size, m: int) -> bool:
    """Whether N:M groups of M tile a weight: its input size (conv: input channels per group)."""
    return shape[1] % m == 0


def allocate_n_m(scores: Mapping[str, Tensor], n: int, m: int) -> dict[str, Tensor]:
    """Keep the N highest of every group of M (see :func:`nm_groups`) of each output row."""
    out = {}
    for name, s in scores.items():
        if not nm_fits(s.shape, m):
            what = "input size" if s.dim() == 2 else "number of input channels (per group)"
            raise SparsityError(
                f"layer {name!r}: N:M with M={m} needs the {what} {s.shape[1]} to be a multiple of M"
            )
        out[name] = from_nm_groups(_drop_lowest_rows(nm_groups(s, m), m - n), s.shape)
    return out


def allocate_threshold(scores: Mapping[str, Tensor], tau: float) -> dict[str, Tensor]:
    """Keep weights whose relative score reaches ``tau`` times the uniform share 1/I."""
    tau = float(tau)
    if not (tau > 0) or math.isinf(tau):
        raise SparsityError(f"threshold must be a positive number, got {tau!r}")
    out = {}
    for name, s in scores.items():
        fan_in = weight_matrix(s).shape[1]
        out[name] = s >= tau / fan_in
    return out


def outlier_ratio(scores: Tensor, m: float) -> float:
    """OWL's layer outlier ratio (Yin et al. 2024): the % of ``scores`` above ``m`` times their mean."""
    flat = scores.reshape(-1).double()
    if not flat.numel():
        raise SparsityError("outlier_ratio of an empty score tensor")
    return float((flat > flat.mean() * m).sum()) / flat.numel() * 100


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL's non-uniform sparsities: more outliers, fewer weights removed; the mean stays ``sparsity``.

    Any per-block measure where larger means "keep more" can stand for the outlier ratios (the
    ``entropy`` allocation passes each block's effective share of weights).

    The outlier ratios are rescaled to [0, 2 * lam] and shifted so the densities average
    ``1 - sparsity``, as in the OWL reference code. Where that would put a block outside [0, 1)
    (the reference clips, and the mean is then no longer ``sparsity``) it is refused, with the
    largest lambda that fits.
    """
    check_sparsity(sparsity)
    if not ratios:
        return []
    if not (0.0 <= lam < 0.5):
        raise SparsityError(f"OWL's lambda must be in [0, 0.5), got {lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0.0:
        return [float(sparsity)] * len(ratios)
    norm = (r - r.min()) / spread
    coeff = 2 * (norm.mean() - norm)  # block sparsity = sparsity + lam * coeff
    out = sparsity + lam * coeff
    if bool((out < 0).any() or (out >= 1).any()):
        up, down = coeff[coeff > 0], -coeff[coeff < 0]
        fits = min([*(((1 - 1e-3) - sparsity) / up).tolist(), *(sparsity / down).tolist()])
        i = int(torch.argmax((out - 0.5).abs()))
        raise SparsityError(f"OWL with lambda {lam} gives block {i} a sparsity of {float(out[i]):.3f}, outside [0, 1) "
                            f"at a mean of {sparsity}; use lambda at most {max(fits, 0.0):.3f}")
    return [float(v) for v in out]


def effective_share(shares: Tensor) -> float:
    """Mean over a layer's outputs of exp(H_i) / I: the effective share of its inputs that carry output i.

    ``shares`` holds each output's mean relative contributions E[r_ij] (rows are normalised to sum
    to 1 here); H_i = -sum_j p_ij log p_ij, so exp(H_i) is the effective number of weights output i
    rests on (../METHOD.md, "Allocation from the contribution distribution").
    """
    rows = weight_matrix(shares).double().clamp_min(0)
    total = rows.sum(1, keepdim=True)
    if not bool((total > 0).all()) or not bool(torch.isfinite(rows).all()):
        raise SparsityError("effective_share needs finite, non-negative shares with a positive sum in every row")
    p = rows / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    return float((entropy.exp() / rows.shape[1]).mean())


def sparsities_by_errors(curves: Sequence[Tensor], sizes: Sequence[int], levels: Sequence[float],
                         sparsity: float) -> list[float]:
    """Per layer, a sparsity among ``levels`` (ascending; the last step may stop between two) so that the
    weights removed are ``sparsity`` of all and the sum of the layers' errors is least: from every layer at
    the lowest level, the next level goes to the layer whose error grows least per weight removed (a
    knapsack by marginal cost; exact where the curves are convex). ``curves[i][k]``: layer i's error at
    ``levels[k]``; ``sizes[i]``: its weight count."""
    check_sparsity(sparsity)
    levels = [float(v) for v in levels]
    if len(levels) < 2 or any(b <= a for a, b in itertools.pairwise(levels)):
        raise SparsityError(f"levels must be at least two ascending sparsities, got {levels}")
    if not levels[0] <= sparsity <= levels[-1]:
        raise SparsityError(f"a sparsity of {sparsity} cannot be met with layer levels from {levels[0]} to "
                            f"{levels[-1]}; widen the levels around it")
    if len(curves) != len(sizes) or any(len(c) != len(levels) for c in curves):
        raise SparsityError("give one error curve per layer, one value per level")
    total = float(sum(sizes))
    target = sparsity * total
    at = [0] * len(sizes)
    removed = levels[0] * total
    out = [levels[0]] * len(sizes)

    def cost(i: int) -> float:
        k = at[i]
        return float(curves[i][k + 1] - curves[i][k]) / ((levels[k + 1] - levels[k]) * sizes[i])

    heap = [(cost(i), i) for i in range(len(sizes)) if sizes[i]]
    heapq.heapify(heap)
    while removed < target - 1e-9 and heap:
        _, i = heapq.heappop(heap)
        k = at[i]
        step = (levels[k + 1] - levels[k]) * sizes[i]
        if removed + step >= target:  # the last step stops where the budget is met
            out[i] = levels[k] + (target - removed) / sizes[i]
            removed = target
            break
        at[i], out[i], removed = k + 1, levels[k + 1], removed + step
        if at[i] + 1 < len(levels):
            heapq.heappush(heap, (cost(i), i))
    return out
