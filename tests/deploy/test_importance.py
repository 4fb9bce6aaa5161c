"""Output importance propagated through relative contributions, and the rc-flow criterion built on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprune
from relprune.errors import RelpruneError, ShrinkError


def _batches(shape, n=2, dtype=torch.float64):
    return [torch.randn(16, *shape, dtype=dtype) for _ in range(n)]


def test_mlp_importance_by_hand_and_conserved_without_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 4, bias=False), nn.ReLU(),
                          nn.Linear(4, 3, bias=False)).double()
    xs = _batches((5,))
    stats = relprune.collect_stats(model, xs, liveness=False, statistics=["relative_mean"])
    imp = relprune.output_importance(model, stats, xs[0])
    torch.testing.assert_close(imp["4"], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(imp["2"], stats["4"].relative_mean.sum(0))
    torch.testing.assert_close(imp["0"], imp["2"] @ stats["2"].relative_mean)
    for name in ("0", "2", "4"):  # every share row sums to one: three units of importance per layer
        assert float(imp[name].sum()) == pytest.approx(3.0, rel=1e-6)


class ConvNet(nn.Module):
    """A conv read by two branches that are concatenated, then a flatten into a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)
        self.c = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        x = F.relu(self.a(x))
        return self.fc(F.relu(torch.cat([self.b(x), self.c(x)], 1)).flatten(1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.a(x))
        return self.fc(F.relu(x + self.b(x)).mean((2, 3)))


def test_importance_through_concat_flatten_and_two_readers_by_hand():
    torch.manual_seed(0)
    model = ConvNet().double()
    xs = _batches((2, 4, 4))
    stats = relprune.collect_stats(model, xs, statistics=["relative_mean"])
    imp = relprune.output_importance(model, stats, xs[0])
    per_channel = (torch.ones(2, dtype=torch.float64) @ stats["fc"].relative_mean).view(4, 16).sum(1)
    torch.testing.assert_close(imp["b"], per_channel[:2])  # b's two channels come first in the concat
    torch.testing.assert_close(imp["c"], per_channel[2:])
    share = {n: stats[n].relative_mean.sum((2, 3)) for n in ("b", "c")}
    torch.testing.assert_close(imp["a"], imp["b"] @ share["b"] + imp["c"] @ share["c"])


def test_a_residual_stream_is_refused_by_name():
    model = Residual().double()
    xs = _batches((2, 4, 4))
    stats = relprune.collect_stats(model, xs, statistics=["relative_mean"])
    with pytest.raises(ShrinkError, match="residual add"):
        relprune.output_importance(model, stats, xs[0])


def test_rc_flow_criterion_scales_each_row_and_prunes_to_the_target():
    torch.manual_seed(0)
    model = ConvNet().double()
    xs = _batches((2, 4, 4))
    stats = relprune.collect_stats(model, xs, statistics=["relative_mean"])
    imp = relprune.output_importance(model, stats, xs[0])
    from relprune.core.criteria import get_criterion

    score = get_criterion("rc-flow").score(model.c.weight, stats["c"], {"importance": imp, "layer": "c"})
    torch.testing.assert_close(score, stats["c"].relative_mean * imp["c"].view(-1, 1, 1, 1))
    masks = relprune.prune(model, stats, sparsity=0.7, criterion="rc-flow", importance=imp)
    assert masks.sparsity == pytest.approx(0.7, abs=0.01)
    with pytest.raises(RelpruneError, match="needs importance="):
        relprune.prune(model, stats, sparsity=0.8, criterion="rc-flow")


def test_importance_refuses_channels_it_cannot_follow_by_name():
    from test_graph import NormBetween

    model = NormBetween().double()
    xs = _batches((4,))
    stats = relprune.collect_stats(model, xs, statistics=["relative_mean"])
    with pytest.raises(ShrinkError, match="LayerNorm"):
        relprune.output_importance(model, stats, xs[0])
