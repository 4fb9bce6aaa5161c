"""Budgets are met exactly, patterns hold, thresholds follow their definition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relprune.core.allocation import (
    allocate,
    allocate_n_m,
    allocate_threshold,
    check_sparsity,
    parse_n_m,
)
from relprune.errors import SparsityError


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(6, 8, generator=g, dtype=torch.float64),
            "b": torch.rand(4, 8, 2, 2, generator=g, dtype=torch.float64)}


@settings(max_examples=30, deadline=None)
@given(sparsity=st.floats(0, 0.99), seed=st.integers(0, 1000))
def test_exact_sparsity_per_scope(sparsity, seed):
    scores = _scores(seed)
    total = sum(s.numel() for s in scores.values())
    keep = allocate(scores, sparsity, "global")
    assert sum(int((~k).sum()) for k in keep.values()) == round(sparsity * total)
    keep = allocate(scores, sparsity, "layer")
    for n, s in scores.items():
        assert int((~keep[n]).sum()) == round(sparsity * s.numel())
    keep = allocate(scores, sparsity, "row")
    for n, s in scores.items():
        removed_per_row = (~keep[n]).reshape(s.shape[0], -1).sum(1)
        assert torch.all(removed_per_row == round(sparsity * s.reshape(s.shape[0], -1).shape[1]))


def test_global_removes_the_lowest_scores():
    scores = _scores()
    keep = allocate(scores, 0.5, "global")
    kept = torch.cat([s[k] for s, k in zip(scores.values(), keep.values(), strict=False)])
    dropped = torch.cat([s[~k] for s, k in zip(scores.values(), keep.values(), strict=False)])
    assert kept.min() >= dropped.max()


def test_n_m_pattern_holds():
    scores = _scores()
    keep = allocate_n_m(scores, 2, 4)
    for n, k in keep.items():
        # Groups are 4 consecutive inputs; for a conv, 4 consecutive input channels at one kernel position.
        groups = (k.permute(0, 2, 3, 1) if k.dim() == 4 else k).reshape(-1, 4)
        assert torch.all(groups.sum(1) == 2)
        s = (scores[n].permute(0, 2, 3, 1) if k.dim() == 4 else scores[n]).reshape(-1, 4)
        assert torch.all(torch.where(groups, s, torch.inf).min(1).values
                         >= torch.where(groups, -torch.inf, s).max(1).values)


def test_n_m_needs_divisible_inputs():
    with pytest.raises(SparsityError, match="multiple of M"):
        allocate_n_m({"a": torch.rand(3, 6)}, 2, 4)


def test_threshold_keeps_scores_above_share():
    s = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)  # uniform share 0.25
    keep = allocate_threshold({"a": s}, 0.5)
    assert keep["a"].tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x", None])
def test_bad_sparsity(bad):
    with pytest.raises(SparsityError):
        check_sparsity(bad)


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "a:b", "2-4", (1,)])
def test_bad_n_m(bad):
    with pytest.raises(SparsityError):
        parse_n_m(bad)


def test_bad_scope_and_threshold():
    with pytest.raises(SparsityError):
        allocate(_scores(), 0.5, "neuron")
    with pytest.raises(SparsityError):
        allocate_threshold(_scores(), 0.0)


def test_n_m_on_a_conv_groups_input_channels_at_each_kernel_position():
    # Scores that rank channels 0 and 1 highest at every kernel position: a channel-wise 2:4 keeps exactly
    # those; the old flattened (C, kh, kw) grouping would keep whole kernel rows of channel 0 instead.
    s = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    s[0, 0], s[0, 1], s[0, 2], s[0, 3] = 4.0, 3.0, 2.0, 1.0
    keep = allocate_n_m({"c": s}, 2, 4)["c"]
    assert keep[0, :2].all() and not keep[0, 2:].any()
    with pytest.raises(SparsityError, match="input channels"):
        allocate_n_m({"c": torch.rand(2, 6, 2, 2)}, 2, 4)


@pytest.mark.parametrize("count, removed", [(5, 3), (7, 4), (3, 2), (9, 5), (4, 2)])
def test_half_budgets_round_up_for_every_group_size(count, removed):
    scores = {"a": torch.arange(count, dtype=torch.float64).reshape(1, count)}
    for scope in ("row", "layer", "global"):
        assert int((~allocate(scores, 0.5, scope)["a"]).sum()) == removed


def test_effective_share_is_exp_entropy_over_fan_in():
    from relprune.core.allocation import effective_share

    uniform = torch.ones(3, 8)
    assert effective_share(uniform) == pytest.approx(1.0)
    one_hot = torch.zeros(3, 8)
    one_hot[:, 2] = 5.0
    assert effective_share(one_hot) == pytest.approx(1 / 8)
    half = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert effective_share(half) == pytest.approx(0.5)
    p = torch.tensor([[0.7, 0.2, 0.1]])
    h = -(p * p.log()).sum()
    assert effective_share(p) == pytest.approx(float(h.exp() / 3))
    with pytest.raises(SparsityError):
        effective_share(torch.zeros(2, 4))


@pytest.mark.parametrize("seed", range(4))
def test_entropy_allocation_averages_to_the_target_and_gives_concentrated_blocks_more(seed):
    from relprune.core.allocation import owl_sparsities

    shares = torch.rand(6, generator=torch.Generator().manual_seed(seed)).tolist()
    out = owl_sparsities(shares, 0.6, 0.08)
    assert sum(out) / len(out) == pytest.approx(0.6)
    assert max(out) - min(out) == pytest.approx(0.16)  # OWL's rescaling: the blocks span 2 lambda
    order = sorted(range(6), key=lambda i: shares[i])
    assert [out[i] for i in order] == sorted(out, reverse=True)
