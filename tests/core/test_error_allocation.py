"""Layer-error curves from the Gram alone, and per-layer sparsities that meet a budget at least total error
(the first stage of allocation by search)."""

from __future__ import annotations

import itertools

import pytest
import torch

from relprune.core.admm import layer_error
from relprune.core.allocation import sparsities_by_errors
from relprune.core.reconstruct import PERCDAMP, damped_gram, error_curve
from relprune.errors import SparsityError


def _reference_curve(w: torch.Tensor, h: torch.Tensor, counts: list[int]) -> list[float]:
    """Row by row with Python loops: OBS saliencies w^2 / [(H + lambda I)^-1]_jj, the smallest ``k`` summed."""
    damped = h.double() + PERCDAMP * h.diagonal().double().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    inv = torch.linalg.inv(damped)
    energy = float(sum(w[i].double() @ damped @ w[i].double() for i in range(w.shape[0])))
    out = []
    for k in counts:
        total = 0.0
        for i in range(w.shape[0]):
            saliency = sorted(float(w[i, j]) ** 2 / float(inv[j, j]) for j in range(w.shape[1]))
            total += sum(saliency[:k])
        out.append(total / energy)
    return out


@pytest.mark.parametrize("shape", [(3, 8), (5, 12), (1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_curve_equals_the_per_row_reference_at_whole_counts(shape, dtype):
    torch.manual_seed(0)
    o, i = shape
    x = torch.randn(64, i, dtype=dtype) @ torch.randn(i, i, dtype=dtype)
    w = torch.randn(o, i, dtype=dtype)
    counts = list(range(i + 1))
    got = error_curve(w, x.T @ x, [k / i for k in counts])
    torch.testing.assert_close(got, torch.tensor(_reference_curve(w, x.T @ x, counts), dtype=torch.float64))
    assert got[0] == 0 and bool((got.diff() >= 0).all())
    # between whole counts the curve is linear
    mid = error_curve(w, x.T @ x, [0.5 / i])
    torch.testing.assert_close(mid[0], got[1] / 2)


def test_with_a_diagonal_gram_the_curve_is_the_exact_error_of_the_best_mask():
    """No two inputs covary: nothing can compensate a removed weight, and the diagonal approximation is exact."""
    torch.manual_seed(1)
    h = torch.diag(torch.rand(10, dtype=torch.float64) + 0.1)
    w = torch.randn(4, 10, dtype=torch.float64)
    damped, _, _ = damped_gram(h, PERCDAMP)
    for k in (2, 5, 7):
        saliency = w.pow(2) * damped.diagonal()
        keep = torch.ones_like(w, dtype=torch.bool).scatter_(1, saliency.argsort(1)[:, :k], False)
        exact = layer_error(w, w * keep, damped) / float(((w @ damped) * w).sum())
        assert float(error_curve(w, h, [k / 10])[0]) == pytest.approx(exact, rel=1e-9)


def test_the_knapsack_meets_the_budget_with_the_least_total_error_by_brute_force():
    g = torch.Generator().manual_seed(0)
    levels = [0.3, 0.4, 0.5, 0.6, 0.7]
    sizes = [100, 100, 100, 100]
    # convex, increasing curves of different steepness
    curves = [torch.cumsum(torch.sort(torch.rand(5, generator=g, dtype=torch.float64)).values * c, 0)
              for c in (1.0, 3.0, 0.5, 2.0)]
    got = sparsities_by_errors(curves, sizes, levels, 0.5)
    assert sum(s * n for s, n in zip(got, sizes, strict=True)) == pytest.approx(0.5 * sum(sizes))
    best = min((sum(float(curves[i][k]) for i, k in enumerate(ks)), ks)
               for ks in itertools.product(range(5), repeat=4) if sum(ks) == 8)  # mean level 0.5
    total = sum(float(curves[i][levels.index(round(s, 6))]) for i, s in enumerate(got))
    assert total == pytest.approx(best[0])


def test_the_last_step_stops_where_the_budget_is_met():
    levels = [0.4, 0.5, 0.6]
    curves = [torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64), torch.tensor([0.0, 2.0, 5.0], dtype=torch.float64)]
    got = sparsities_by_errors(curves, [10, 30], levels, 0.45)
    # per weight removed, the second layer's next step costs 2 / 3, the first's 1 / 1: the second goes first,
    # and its step (3 weights) overshoots the 2 still wanted, so it stops at 0.4 + 2 / 30
    assert got == pytest.approx([0.4, 0.4 + 2 / 30])
    assert 10 * got[0] + 30 * got[1] == pytest.approx(0.45 * 40)


@pytest.mark.parametrize("levels, sparsity, message", [
    ([0.4, 0.6], 0.7, "cannot be met"), ([0.5], 0.5, "at least two"), ([0.6, 0.5], 0.55, "ascending"),
    ([0.4, 0.6], 1.2, "sparsity")])
def test_budgets_the_levels_cannot_meet_are_refused(levels, sparsity, message):
    curves = [torch.zeros(len(levels), dtype=torch.float64)]
    with pytest.raises(SparsityError, match=message):
        sparsities_by_errors(curves, [10], levels, sparsity)
