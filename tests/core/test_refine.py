"""Mask refinement: it never raises a row's output error, keeps every count, never revives what was
pruned before, and matches the error it claims against the per-sample reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprune
from relprune.core.admm import project
from relprune.core.refine import refine_mask, row_errors
from relprune.errors import RelpruneError, SparsityError


def problem(o: int, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, i, generator=g) @ (torch.randn(i, i, generator=g) / i**0.5 + torch.eye(i)) + 0.5
    x[:, :2] *= 8
    return torch.randn(o, i, generator=g), x, x.T @ x


@pytest.mark.parametrize("n_m", [None, (2, 4), (1, 4)])
@pytest.mark.parametrize("seed", range(3))
def test_refinement_never_raises_the_error_and_keeps_the_counts(n_m, seed):
    w, x, h = problem(12, 32, seed)
    wanda = w.abs() * x.norm(dim=0)
    keep = project(wanda, n_m=n_m) if n_m else project(wanda, sparsity=0.6)
    new = refine_mask(w, h, keep, n_m=n_m)
    before, after = row_errors(w, h, keep), row_errors(w, h, new)
    assert (after <= before * (1 + 1e-9)).all()
    assert after.sum() < before.sum()  # Wanda's mask ignores the inputs' correlations; swaps find them
    if n_m:
        assert torch.equal(new.reshape(-1, n_m[1]).sum(1), keep.reshape(-1, n_m[1]).sum(1))
    else:
        assert torch.equal(new.sum(1), keep.sum(1))
    # The error it minimises is the per-sample output error of the pruned row, without a re-fit.
    per_sample = ((x.double() @ (w.double() * ~new).T) ** 2).sum(0)
    torch.testing.assert_close(per_sample, row_errors(w, h, new), rtol=1e-5, atol=1e-6)


def test_weights_pruned_before_stay_pruned():
    w, x, h = problem(8, 16, 1)
    fixed = torch.zeros_like(w, dtype=torch.bool)
    fixed[:, :4] = True
    keep = project(torch.where(fixed, torch.zeros_like(w), w.abs() * x.norm(dim=0) + 1), sparsity=0.5)
    new = refine_mask(w, h, keep, fixed=fixed)
    assert not new[fixed].any()


def test_refine_through_prune_lowers_the_mask_only_error_and_is_refused_where_it_cannot_apply():
    torch.manual_seed(0)
    x = torch.randn(256, 24) @ (torch.randn(24, 24) / 5 + torch.eye(24)) + 1.0
    errors = {}
    for refine in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 32))
        dense = model[0].weight.detach().clone()
        stats = relprune.collect_stats(model, [x], statistics=["input_sq_mean", "input_gram"])
        masks = relprune.prune(model, stats, criterion="wanda", sparsity=0.5, scope="row", refine=refine)
        assert masks.sparsity == 0.5
        relprune.make_permanent(model)
        errors[refine] = float(((x @ (dense - model[0].weight.detach()).T) ** 2).sum())
    assert errors[True] < errors[False]
    model = nn.Sequential(nn.Linear(24, 32))
    before = model[0].weight.detach().clone()
    stats = relprune.collect_stats(model, [x], statistics=["input_sq_mean"])
    with pytest.raises(RelpruneError, match="input_gram"):
        relprune.prune(model, stats, criterion="wanda", sparsity=0.5, refine=True)
    with pytest.raises(SparsityError, match="chooses its mask"):
        relprune.prune(model, stats, criterion="sparsegpt", sparsity=0.5, refine=True)
    with pytest.raises(SparsityError, match="threshold"):
        relprune.prune(model, stats, criterion="rc", threshold=0.5, refine=True)
    assert torch.equal(model[0].weight, before)


def test_bad_arguments_are_refused():
    w, _, h = problem(4, 8, 0)
    keep = torch.ones_like(w, dtype=torch.bool)
    with pytest.raises(SparsityError, match="Gram"):
        refine_mask(w, h[:4, :4], keep)
    with pytest.raises(SparsityError, match="mask"):
        refine_mask(w, h, keep[:2])
    with pytest.raises(RelpruneError, match="max_swaps"):
        refine_mask(w, h, keep, max_swaps=-1)
    with pytest.raises(SparsityError, match="multiple of M"):
        refine_mask(w[:, :6], h[:6, :6], keep[:, :6], n_m=(2, 4))
