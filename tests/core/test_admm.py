"""Masks chosen with the weights (ADMM, gradual) against brute force, the ALPS reference port, and
the properties they must hold; the re-fit's damping anchor against the closed form."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import relprune
from relprune.core.admm import _Ridge, admm_prune, gradual_prune, layer_error, project, ridge_factor
from relprune.core.reconstruct import damped_inverse_diagonal, refit
from relprune.errors import RelpruneError, SingularGramError, SparsityError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from alps_port import alps_admm


def problem(o: int, i: int, tokens: int, seed: int, outliers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(i, i, generator=g) / i**0.5 + torch.eye(i)
    x = torch.randn(tokens, i, generator=g, dtype=torch.float32) @ mix + 0.3
    x[:, :outliers] *= 10
    w = torch.randn(o, i, generator=g)
    return w.double(), (x.T @ x).double()


def damped_error(w0: torch.Tensor, w: torch.Tensor, h: torch.Tensor, percdamp: float = 0.01) -> float:
    hd = h.clone()
    hd.diagonal().add_(percdamp * h.diagonal().mean())
    return layer_error(w0, w, hd)


def brute_force_row(w0: torch.Tensor, h: torch.Tensor, kept: int, percdamp: float = 0.01) -> float:
    """The optimum of the damped L0-constrained least squares, one row at a time over every support."""
    hd = h.clone()
    hd.diagonal().add_(percdamp * h.diagonal().mean())
    total = 0.0
    for row in w0:
        best = float("inf")
        for support in itertools.combinations(range(w0.shape[1]), kept):
            s = list(support)
            w = torch.zeros_like(row)
            w[s] = torch.linalg.solve(hd[s][:, s], (hd @ row)[s])
            d = row - w
            best = min(best, float(d @ hd @ d))
        total += best
    return total


def test_admm_is_near_the_brute_force_optimum_and_beats_criterion_then_refit():
    # A heuristic for an NP-hard problem: exact on most instances, never below the optimum, and on the
    # whole well below choosing the mask first (OBS saliency) and re-fitting.
    ratios, ours_total, one_shot_total = [], 0.0, 0.0
    for seed in range(12):
        w0, h = problem(3, 8, tokens=40, seed=seed, outliers=1)
        new, keep = admm_prune(w0, h, sparsity=0.5)
        assert (keep.sum(1) == 4).all() and (new[~keep] == 0).all()
        optimum = brute_force_row(w0, h, kept=4)
        ours = damped_error(w0, new, h)
        assert optimum <= ours * (1 + 1e-9)
        ratios.append(ours / optimum)
        saliency = w0**2 / damped_inverse_diagonal(h, 0.01).reshape(1, -1)
        ours_total += ours
        one_shot_total += damped_error(w0, refit(w0, h, project(saliency, sparsity=0.5)), h)
    ratios.sort()
    assert ratios[len(ratios) // 2] <= 1.05 and sum(ratios) / len(ratios) <= 1.15
    assert ours_total <= 0.95 * one_shot_total


@pytest.mark.parametrize("budget", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"n_m": (2, 4)}])
def test_admm_matches_the_ported_alps_reference_on_a_layer(budget):
    w0, h = problem(48, 64, tokens=512, seed=1, outliers=2)
    w0, h = w0.float(), h.float()
    if "n_m" in budget:
        ref = alps_admm(w0, h, nm_n=2, nm_m=4)
        new, keep = admm_prune(w0, h, n_m=(2, 4))
    else:
        ref = alps_admm(w0, h, sp=budget["sparsity"])
        new, keep = admm_prune(w0, h, group="layer", **budget)
    assert keep.sum() == (ref != 0).sum()
    assert (keep == (ref != 0)).float().mean() > 0.9
    ours, theirs = layer_error(w0, new, h), layer_error(w0, ref, h)
    assert ours <= 1.02 * theirs


@pytest.mark.parametrize("rows, inputs", [(48, 32), (8, 64), (32, 96), (64, 64)])
def test_the_ridge_step_is_the_regularised_solve(rows, inputs):
    _, h = problem(rows, inputs, tokens=200, seed=3)
    h = h / h.diagonal().mean()
    ridge = _Ridge(h.float(), rows=rows)
    assert ridge.solves == (rows < inputs)  # triangular solves for wide layers, the formed inverse otherwise
    rhs = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(4))
    formed = []
    for rho in (0.1, 0.13, 0.13, 5.0):  # a repeated rho reuses the factor (or inverse) formed for it
        expected = torch.linalg.solve(h + rho * torch.eye(inputs, dtype=torch.float64), rhs.double().T).T
        torch.testing.assert_close(ridge(rhs, rho).double(), expected, rtol=2e-4, atol=2e-4)
        formed.append(ridge.factor if ridge.solves else ridge.inverse)
        assert (ridge.factor is None) != (ridge.inverse is None)  # one of the two held, never both
    assert formed[1] is formed[2] and formed[0] is not formed[1]


def test_the_ridge_factor_falls_back_to_float64_where_float32_loses_definiteness():
    # [[1, 1], [1, 1]] + 1e-9 I is positive definite, but 1 + 1e-9 rounds to 1 in float32: a singular matrix.
    gram = torch.ones(2, 2)
    assert int(torch.linalg.cholesky_ex(gram + 1e-9 * torch.eye(2)).info) != 0
    factor = ridge_factor(gram, 1e-9)
    assert factor.dtype == torch.float32 and torch.equal(factor, factor.triu())
    expected = torch.linalg.cholesky(gram.double() + 1e-9 * torch.eye(2, dtype=torch.float64), upper=True)
    torch.testing.assert_close(factor.double(), expected, rtol=1e-6, atol=1e-9)


def test_a_ridge_system_no_precision_makes_definite_is_a_singular_gram_error():
    gram = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1: a penalty of 0.5 leaves it indefinite
    with pytest.raises(SingularGramError, match="percdamp"):
        ridge_factor(gram, 0.5)


@pytest.mark.parametrize("rows, inputs", [(96, 384), (384, 192)])
def test_admm_gives_the_same_bits_on_one_thread_as_on_two(rows, inputs):
    # Block-by-block pruning sets torch's thread count from the machine's load: the result must not depend on it.
    w, h = problem(rows, inputs, tokens=4 * inputs, seed=5)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            results.append(admm_prune(w, h, sparsity=0.5))
    finally:
        torch.set_num_threads(before)
    (w2, k2), (w1, k1) = results
    assert torch.equal(k2, k1) and torch.equal(w2, w1)


def test_projection_patterns():
    v = torch.randn(6, 16)
    assert (project(v, sparsity=0.25).sum(1) == 12).all()
    assert project(v, sparsity=0.25, group="layer").sum() == 72
    nm = project(v, n_m=(2, 4))
    assert (nm.reshape(-1, 4).sum(1) == 2).all()
    kept = v.abs().reshape(-1, 4)[nm.reshape(-1, 4)].reshape(-1, 2).min(1).values
    dropped = v.abs().reshape(-1, 4)[~nm.reshape(-1, 4)].reshape(-1, 2).max(1).values
    assert (kept >= dropped).all()


@pytest.mark.parametrize("budget", [{"sparsity": 0.6}, {"n_m": (2, 4)}])
@pytest.mark.parametrize("seed", range(3))
def test_gradual_is_its_own_masks_refit_never_revives_and_beats_one_shot(budget, seed):
    w0, h = problem(16, 32, tokens=200, seed=seed, outliers=2)
    new, keep = gradual_prune(w0, h, **budget)
    if "n_m" in budget:
        assert (keep.reshape(-1, 4).sum(1) == 2).all()
    else:
        assert (keep.sum(1) == 13).all()
    assert (new[~keep] == 0).all()
    fixed = refit(w0, h, keep)
    assert layer_error(w0, new, h) <= layer_error(w0, fixed, h) * (1 + 1e-6)
    saliency = w0**2 / damped_inverse_diagonal(h, 0.01).reshape(1, -1)
    one_shot = refit(w0, h, project(saliency, **budget))
    assert damped_error(w0, new, h) <= damped_error(w0, one_shot, h) * 1.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refit_anchor_dense_and_zero_are_their_closed_forms(dtype):
    w0, h = problem(5, 12, tokens=100, seed=7)
    keep = torch.rand(w0.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    hd = h.clone()
    hd.diagonal().add_(0.01 * h.diagonal().mean())
    for anchor, rhs in (("dense", hd), ("zero", h)):
        new = refit(w0.to(dtype), h.to(dtype), keep, anchor=anchor, tol=1e-12, max_iter=200)
        assert new.dtype == dtype
        for r in range(5):
            s = keep[r].nonzero().flatten()
            sol = torch.linalg.solve(hd[s][:, s], (rhs @ w0[r])[s])
            torch.testing.assert_close(new[r, s].double(), sol, rtol=1e-3, atol=1e-4)
    with pytest.raises(RelpruneError, match="anchor"):
        refit(w0, h, keep, anchor="north")


def test_solver_options_out_of_range_are_refused_by_name():
    w0, h = problem(4, 8, tokens=30, seed=0)
    for kwargs, word in [({"rho": 0.0}, "rho"), ({"rho": float("nan")}, "rho"), ({"max_iter": 0}, "max_iter"),
                         ({"update_iter": 1.5}, "update_iter"), ({"switch_iter": -1}, "switch_iter"),
                         ({"group": "block"}, "group")]:
        with pytest.raises(RelpruneError, match=word):
            admm_prune(w0, h, sparsity=0.5, **kwargs)
    with pytest.raises(RelpruneError, match="steps"):
        gradual_prune(w0, h, sparsity=0.5, steps=0)
    for solver in (admm_prune, gradual_prune):
        with pytest.raises(SparsityError):
            solver(w0, h, sparsity=1.0)
        with pytest.raises(SparsityError, match="multiple of M"):
            solver(w0[:, :6], h[:6, :6], n_m=(2, 4))
        with pytest.raises(SparsityError, match="exactly one"):
            solver(w0, h)


@pytest.mark.parametrize("criterion", ["admm", "gradual"])
@pytest.mark.parametrize("budget", [{"sparsity": 0.5}, {"n_m": "2:4"}])
def test_prune_with_a_joint_solver_lowers_the_error_of_sparsegpt_on_average(criterion, budget):
    torch.manual_seed(0)
    errors = {}
    x = torch.randn(256, 32) @ (torch.randn(32, 32) / 6 + torch.eye(32))
    for crit in (criterion, "sparsegpt"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
        dense = model[0].weight.detach().clone()
        stats = relprune.collect_stats(model, [x], statistics=["input_gram"])
        masks = relprune.prune(model, stats, criterion=crit, **budget)
        relprune.make_permanent(model)
        assert masks.sparsity == pytest.approx(0.5, abs=0.01)
        errors[crit] = float(((x @ (dense - model[0].weight.detach()).T) ** 2).sum())
    assert errors[criterion] <= errors["sparsegpt"] * 1.05


def test_a_gram_singular_even_with_damping_is_named_with_the_damping_that_fixes_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(64, 6)
    stats = relprune.collect_stats(model, [x], statistics=["input_gram"])
    gram = stats["0"].input_gram
    # A second moment no data can give (an eigenvalue far below zero), as a corrupt statistics file would hold.
    v = torch.zeros(6, dtype=gram.dtype)
    v[0] = 1.0
    sums = stats["0"].sums["gram"]
    sums.copy_(sums - 3 * float(sums.diagonal().mean()) * torch.outer(v, v).to(sums.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    for criterion, kw in (("sparsegpt", {}), ("obs", {}), ("magnitude", {"reconstruct": "obs"})):
        with pytest.raises(relprune.SingularGramError, match=r"layer '0'.*a damping of") as info:
            relprune.prune(model, stats, criterion=criterion, sparsity=0.5, **kw)
        assert info.value.needed is not None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    from relprune.core.reconstruct import damped_cholesky

    damped_cholesky(stats["0"].input_gram, info.value.needed)  # the damping it names does fix it


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [{"sparsity": 0.5}, {"sparsity": 0.3, "group": "layer"}, {"sparsity": 0.9},
                                    {"n_m": (2, 4)}, {"n_m": (1, 4)}, {"n_m": (3, 8)}, {"n_m": (4, 16)}])
@pytest.mark.parametrize("ties", [False, True])
def test_keep_largest_keeps_the_budget_and_never_drops_a_larger_score(seed, budget, ties):
    # The property topk gives: the exact count per row (group, layer), and within it no dropped
    # score above a kept one; with many ties (small integers) and -inf entries too.
    from relprune.core.admm import keep_largest
    from relprune.core.allocation import removal_count

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (12, 32), generator=g).double() if ties else torch.randn(12, 32, generator=g)
    scores[0, :5] = -math.inf
    keep = keep_largest(scores, **budget)
    if "n_m" in budget:
        n, m = budget["n_m"]
        units, kept = scores.reshape(-1, m), keep.reshape(-1, m)
        assert bool((kept.sum(1) == n).all())
    elif budget.get("group") == "layer":
        units, kept = scores.reshape(1, -1), keep.reshape(1, -1)
        assert int(kept.sum()) == scores.numel() - removal_count(budget["sparsity"], scores.numel())
    else:
        units, kept = scores, keep
        assert bool((kept.sum(1) == 32 - removal_count(budget["sparsity"], 32)).all())
    lowest_kept = torch.where(kept, units, torch.full_like(units, math.inf)).min(1).values
    highest_dropped = torch.where(~kept, units, torch.full_like(units, -math.inf)).max(1).values
    assert bool((highest_dropped <= lowest_kept).all())
