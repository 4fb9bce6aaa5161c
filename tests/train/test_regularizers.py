"""Pruning-aware regularisers: exact gradients, the intended effect, clean detach."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import relprune
from relprune.experiments.explain import neuron_entropy
from relprune.train.regularizers import (
    REGULARIZERS,
    ContributionEntropy,
    alpha_ramp,
    make_regularizer,
)


def tiny(conv=False):
    torch.manual_seed(0)
    if conv:
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(3 * 4 * 4, 4)).double()
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _value(model, reg, x):
    model(x)
    return reg()


@pytest.mark.parametrize("kind", sorted(REGULARIZERS))
@pytest.mark.parametrize("conv", [False, True])
def test_gradient_matches_finite_differences(kind, conv):
    model = tiny(conv)
    model.eval()  # BN with running stats: the function is deterministic
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64) if conv else torch.randn(8, 5, dtype=torch.float64)
    reg = make_regularizer(kind, model, x)
    value = _value(model, reg, x)
    params = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    grads = torch.autograd.grad(value, params)
    gen = torch.Generator().manual_seed(1)
    h = 1e-6
    for p, g in zip(params, grads, strict=True):
        for _ in range(4):
            i = int(torch.randint(p.numel(), (1,), generator=gen))
            with torch.no_grad():
                p.view(-1)[i] += h
                up = float(_value(model, reg, x))
                p.view(-1)[i] -= 2 * h
                down = float(_value(model, reg, x))
                p.view(-1)[i] += h
            assert (up - down) / (2 * h) == pytest.approx(float(g.view(-1)[i]), rel=1e-4, abs=1e-7)
    reg.detach()


def test_entropy_regulariser_lowers_measured_entropy():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :2].sum(1) > 0).long()

    def run(alpha):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
        reg = ContributionEntropy(model, x[:32])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) + alpha * reg()
            loss.backward()
            opt.step()
        reg.detach()
        stats = relprune.collect_stats(model, [x], statistics=["relative_mean"])
        return float(torch.cat([neuron_entropy(s.relative_mean) for s in stats.values()]).nanmean())

    assert run(1.0) < run(0.0) - 0.05


def test_liveness_source_found_through_batchnorm_and_detach_restores_hooks():
    model = tiny(conv=True)
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    modes = [m.training for m in model.modules()]
    reg = ContributionEntropy(model, torch.randn(4, 2, 4, 4, dtype=torch.float64))
    assert reg.sources["0"] == ("1", "relu(0, inf)")  # liveness read from the BN output
    assert reg.sources["4"] is None
    reg.detach()
    assert before == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    assert modes == [m.training for m in model.modules()]


def test_calling_before_forward_is_an_error():
    model = tiny()
    reg = make_regularizer("entropy", model)
    with pytest.raises(relprune.RelpruneError, match="forward"):
        reg()
    with pytest.raises(relprune.RelpruneError, match="unknown regulariser"):
        make_regularizer("l0", model)


def test_alpha_ramp():
    fn = alpha_ramp(2.0, 0.5, epochs=2, steps_per_epoch=10)
    assert fn(0, 0) == 0 and fn(0, 5) == pytest.approx(1.0) and fn(1, 0) == 2.0 and fn(1, 9) == 2.0


def test_neuron_entropy_hand_cases():
    shares = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    h = neuron_entropy(shares)
    assert h[0] == pytest.approx(1.0) and h[1] == pytest.approx(0.0) and torch.isnan(h[2])


def _entropy_by_definition(weight, sums, counts):
    # The plain formula, differentiated by autograd: the reference for the written-out gradient.
    share = weight.abs() * sums
    total = share.sum(1)
    safe = total.clamp_min(1e-30)
    h = (safe.log() - (share * share.clamp_min(1e-30).log()).sum(1) / safe) / math.log(share.shape[1])
    h = torch.where(total > 0, h, torch.zeros_like(h))
    return h[counts > 0].mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalised_entropy_equals_the_definition_with_its_gradient(dtype):
    from relprune.train.regularizers import _normalised_entropy

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 9, generator=g, dtype=dtype)
    sums = torch.rand(6, 9, generator=g, dtype=dtype)
    sums[1, :4] = 0.0  # some zero shares
    sums[2] = 0.0  # a neuron whose shares are all zero counts as entropy 0
    weight[4, 3] = 0.0  # a weight at zero: |w| has no slope there
    counts = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0, 1.0], dtype=dtype)
    q = (weight.abs() * sums) / (weight.abs() * sums).sum(1, keepdim=True).clamp_min(1e-30)
    h = -(torch.special.xlogy(q, q)).sum(1) / math.log(9)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    w1, s1 = weight.clone().requires_grad_(), sums.clone().requires_grad_()
    w2, s2 = weight.clone().requires_grad_(), sums.clone().requires_grad_()
    ours, ref = _normalised_entropy(w1, s1, counts), _entropy_by_definition(w2, s2, counts)
    torch.testing.assert_close(ours, h[counts > 0].mean(), **tol)
    torch.testing.assert_close(ours, ref, **tol)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(w1.grad, w2.grad, **tol)
    torch.testing.assert_close(s1.grad, s2.grad, **tol)


def test_share_entropy_passes_gradcheck():
    from relprune.train.regularizers import _ShareEntropy

    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    sums = (torch.rand(4, 7, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(_ShareEntropy.apply, (weight, sums))
