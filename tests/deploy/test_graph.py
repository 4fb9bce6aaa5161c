"""The dependency graph and group pruning: each operation kind shrinks exactly or is refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprune
from relprune.deploy.graph import DependencyGraph
from relprune.deploy.groups import (
    cost,
    group_scores,
    plan,
    prune_groups,
    shrink_groups,
    structured_masks,
)
from relprune.errors import ShrinkError


class Residual(nn.Module):
    """Two basic blocks, the second with a 1x1 downsampling shortcut, then pool, flatten, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.d1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.d2 = nn.BatchNorm2d(12)
        self.short = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b2(self.a2(F.relu(self.b1(self.a1(x))))))
        x = F.relu(self.short(x) + self.d2(self.c2(F.relu(self.d1(self.c1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 7, 3)
        self.fc = nn.Linear(7 * 4 * 4, 3)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.fc(F.relu(self.c(y)).flatten(1))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 10, 1)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.bn = nn.BatchNorm2d(10)
        self.project = nn.Conv2d(10, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu6(self.bn(self.dw(F.relu6(self.expand(x)))))
        return self.fc(self.project(x).mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.b(F.relu(self.g(F.relu(self.a(x))))).mean((2, 3)))


class ResNeXtBlock(nn.Module):
    """A ResNeXt-style bottleneck: 1x1, grouped 3x3 (4 groups) with BatchNorm, 1x1, a residual add; and a
    grouped 1x1 whose output is added straight to a plain convolution's (the plain side gets folded)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.g = nn.Conv2d(12, 12, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.expand = nn.Conv2d(12, 8, 1)
        self.side = nn.Conv2d(8, 6, 1)
        self.gside = nn.Conv2d(8, 6, 1, groups=2)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.bn2(self.g(F.relu(self.bn1(self.reduce(x))))))
        x = F.relu(x + self.expand(y))
        return self.fc(F.relu(self.side(x) + self.gside(x)).flatten(1))


class GatedMLP(nn.Module):
    """Tokens (B, T, D): down(silu(gate(x)) * up(x)) + x, then a head."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(6, 16, bias=False)
        self.up = nn.Linear(6, 16, bias=False)
        self.down = nn.Linear(16, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x + self.down(F.silu(self.gate(x)) * self.up(x)))


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 3 * 3, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        return self.fc2(F.relu(self.fc1(x.view(x.shape[0], -1))))


CASES = {
    "residual": (Residual, (2, 3, 8, 8)),
    "concat": (Concat, (2, 3, 6, 6)),
    "depthwise": (Depthwise, (2, 3, 6, 6)),
    "grouped": (Grouped, (2, 3, 6, 6)),
    "resnext": (ResNeXtBlock, (2, 3, 4, 4)),
    "gated-mlp": (GatedMLP, (2, 5, 6)),
    "flatten": (Flat, (2, 1, 8, 8)),
}


def build(kind):
    torch.manual_seed(0)
    cls, shape = CASES[kind]
    model = cls().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model, torch.randn(*shape)


def n_params(model):
    return sum(p.numel() for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("criterion", ["l1", "l2", "random"])
def test_shrunk_model_equals_the_masked_model(kind, criterion):
    model, x = build(kind)
    graph = DependencyGraph(model, x)
    scores = group_scores(graph, None, criterion, seed=3)
    p = plan(graph, scores, 0.4)
    small = shrink_groups(model, graph, p.keep)
    masked = copy.deepcopy(model)
    relprune.apply_masks(masked, structured_masks(graph, p.keep))
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), model(x))
    # The cost formula matches the shrunk model's parameters (weights, biases, norm affines).
    assert cost(DependencyGraph(small, x))[1] == p.params[1] == n_params(small)
    assert p.flops[1] <= 0.6 * p.flops[0] + 1e-9
    assert n_params(model) == p.params[0]


def test_residual_groups_join_the_added_channels():
    model, x = build("residual")
    graph = DependencyGraph(model, x)
    stem = graph.group_of("stem.0")
    assert {m.module for m in stem.members if m.role == "out"} == {"stem.0", "a2"}
    assert {m.module for m in stem.members if m.role == "in"} == {"a1", "c1", "short.0"}
    inner = graph.group_of("a1")
    assert {(m.module, m.role) for m in inner.members} == {("a1", "out"), ("b1", "norm"), ("a2", "in")}
    out_group = graph.group_of("fc")
    assert not out_group.prunable and "output" in out_group.reason


def test_concat_flatten_offsets_and_depthwise_membership():
    model, x = build("concat")
    graph = DependencyGraph(model, x)
    b = graph.group_of("b")
    assert [(m.module, m.role, m.offset) for m in b.members if m.role != "out"] == [("bn", "norm", 4), ("c", "in", 4)]
    c = graph.group_of("c")
    assert [(m.module, m.expand) for m in c.members if m.role == "in"] == [("fc", 16)]
    model, x = build("depthwise")
    g = DependencyGraph(model, x).group_of("expand")
    assert {(m.module, m.role) for m in g.members} == {("expand", "out"), ("dw", "depthwise"), ("bn", "norm"),
                                                       ("project", "in")}


def test_grouped_convolution_folds_its_channels_into_slots_of_every_group():
    model, x = build("grouped")
    graph = DependencyGraph(model, x)
    a, g = graph.group_of("a"), graph.group_of("g")
    # Conv a's 8 channels become 4 slots (channel j of both groups of g); g's column j is slot j.
    assert a.size == 4 and {(m.module, m.role, m.repeat) for m in a.members} == {("a", "out", 2), ("g", "in", 1)}
    assert g.size == 4 and {(m.module, m.role, m.repeat) for m in g.members} == {("g", "out", 2), ("b", "in", 2)}
    assert a.members[0].index(4).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    keep = {graph.groups.index(a): torch.tensor([1, 3]), graph.groups.index(g): torch.tensor([0, 1, 2])}
    small = shrink_groups(model, graph, keep)
    assert (small.a.out_channels, small.g.in_channels, small.g.out_channels, small.g.groups) == (4, 4, 6, 2)
    assert torch.equal(small.a.weight, model.a.weight[[1, 3, 5, 7]])
    assert torch.equal(small.g.weight, model.g.weight[[0, 1, 2, 4, 5, 6]][:, [1, 3]])
    assert torch.equal(small.b.weight, model.b.weight[:, [0, 1, 2, 4, 5, 6]])
    # Data-driven slot scores by hand: slot j of a is column j of g's weight, for every row (both groups).
    stats = relprune.collect_stats(model, [(x, torch.zeros(2, dtype=torch.long))])
    rc = group_scores(graph, stats, "rc")
    torch.testing.assert_close(rc[graph.groups.index(a)], stats["g"].relative_mean.sum((0, 2, 3)).double())
    b_cols = stats["b"].relative_mean.sum((0, 2, 3)).double()
    torch.testing.assert_close(rc[graph.groups.index(g)], b_cols[:4] + b_cols[4:])


def test_grouped_convolution_meeting_another_grouping_is_refused_by_name():
    class TwoGroupings(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 12, 1)
            self.g2 = nn.Conv2d(12, 12, 3, padding=1, groups=2)
            self.g3 = nn.Conv2d(12, 6, 1, groups=3)
            self.b = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.b(F.relu(self.g3(F.relu(self.g2(F.relu(self.a(x))))))).mean((2, 3))

    model, x = TwoGroupings().eval(), torch.randn(2, 3, 5, 5)
    before = copy.deepcopy(model.state_dict())
    graph = DependencyGraph(model, x)
    assert graph.group_of("a").prunable and graph.group_of("g3").prunable
    assert "grouped convolution g3 (groups=3)" in graph.group_of("g2").reason
    result = prune_groups(model, x, 0.3)
    assert result.model.g2.out_channels == 12 and result.model.a.out_channels < 12
    with torch.no_grad():
        masked = copy.deepcopy(model)
        relprune.apply_masks(masked, structured_masks(graph, result.plan.keep))
        torch.testing.assert_close(result.model(x), masked(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_gated_mlp_unites_gate_and_up_rows_with_down_columns():
    model, x = build("gated-mlp")
    g = DependencyGraph(model, x).group_of("gate")
    assert {(m.module, m.role) for m in g.members} == {("gate", "out"), ("up", "out"), ("down", "in")}
    residual = DependencyGraph(model, x).group_of("down")
    assert not residual.prunable  # the residual stream is the model input's channels


def test_untraceable_model_is_one_clear_error_and_leaves_help():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                x = x * 2
            return self.b(self.a(x))

    with pytest.raises(ShrinkError, match="leaves="):
        DependencyGraph(Branchy(), torch.randn(2, 4))


class NormBetween(nn.Module):
    """Two Linears with a LayerNorm over the channels between them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_channel_mixing_operation_is_refused_by_name():
    graph = DependencyGraph(NormBetween(), torch.randn(2, 4))
    assert "norm (LayerNorm) normalises over them" in graph.group_of("a").reason
    with pytest.raises(ShrinkError, match="no channel group can be pruned"):
        prune_groups(NormBetween(), torch.randn(2, 4), 0.5)


@pytest.mark.parametrize("criterion", ["rc", "fluctuation", "taylor"])
def test_data_driven_group_scores_by_hand_on_a_two_layer_mlp(criterion):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    xs = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))) for _ in range(2)]
    stats = relprune.collect_stats(model, xs)
    graph = DependencyGraph(model, xs[0][0])
    (_gi, got), = group_scores(graph, stats, criterion).items()
    s1, s2 = stats["0"], stats["2"]
    if criterion == "rc":
        want = s2.relative_mean.sum(0)
    elif criterion == "fluctuation":
        want = (s2.contribution_std ** 2).sum(0)
    else:
        want = (s1.weight * s1.weight_grad).abs().sum(1) + (s2.weight * s2.weight_grad).abs().sum(0)
    torch.testing.assert_close(got, want.double())


def test_fluctuation_bias_compensation_keeps_the_mean_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    xs = [torch.randn(64, 3, dtype=torch.float64) + 1 for _ in range(2)]
    stats = relprune.collect_stats(model, xs)
    result = prune_groups(model, xs[0], 0.5, criterion="fluctuation", stats=stats, budget="params",
                          bias_compensation=True)
    x = torch.cat(xs)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x).mean(0), model(x).mean(0))


@pytest.mark.parametrize("budget", ["flops", "params"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_budget_is_met_and_every_group_keeps_a_channel(budget, scope):
    model, x = build("residual")
    graph = DependencyGraph(model, x)
    p = plan(graph, group_scores(graph, None, "l2"), 0.5, budget=budget, scope=scope)
    before, after = p.flops if budget == "flops" else p.params
    assert after <= 0.5 * before
    assert all(len(k) >= 1 for k in p.keep.values())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_round_to_keeps_multiples_and_still_meets_the_budget(scope):
    model, x = build("residual")
    graph = DependencyGraph(model, x)
    scores = group_scores(graph, None, "l2")
    p = plan(graph, scores, 0.4, scope=scope, round_to=4)
    assert p.flops[1] <= 0.6 * p.flops[0]
    for gi, kept in p.keep.items():
        assert len(kept) % 4 == 0 or len(kept) == graph.groups[gi].size
    for gi, kept in p.keep.items():  # the highest-scored channels are the ones kept
        dropped = torch.ones(len(scores[gi]), dtype=torch.bool)
        dropped[kept] = False
        if dropped.any():
            assert scores[gi][kept].min() >= scores[gi][dropped].max()
    with pytest.raises(relprune.RelpruneError, match="round_to"):
        plan(graph, scores, 0.4, round_to=0)


@pytest.mark.parametrize("form", ["dense", "masked", "sparse"])
def test_every_export_form_round_trips_a_residual_model(tmp_path, form):
    from relprune.deploy import export

    model, x = build("residual")
    relprune.prune(model, None, sparsity=0.6, criterion="magnitude")
    write = {"dense": export.export_dense, "masked": export.export_masked, "sparse": export.export_sparse}[form]
    write(model, tmp_path)
    with pytest.raises(relprune.RelpruneError, match="pass model="):
        export.load_exported(tmp_path)
    fresh, _ = build("residual")
    loaded, meta = export.load_exported(tmp_path, model=fresh)
    assert meta["architecture"] is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_shrunk_residual_model_exports_as_a_program_that_loads_without_its_class(tmp_path):
    from relprune.deploy import export

    model, x = build("residual")
    small = prune_groups(model, x, 0.5).model
    export.export_program(small, x, tmp_path)
    loaded, meta = export.load_exported(tmp_path)
    assert meta["format"] == "program" and not isinstance(loaded, Residual)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
        torch.testing.assert_close(loaded(torch.cat([x, x, x])), small(torch.cat([x, x, x])))


def test_a_registered_group_score_is_used_like_the_built_in_ones(monkeypatch):
    """A new channel score only adds a member function (as a criterion only adds a score function)."""
    from relprune.deploy import groups

    monkeypatch.setattr(groups, "GROUP_SCORES", dict(groups.GROUP_SCORES))

    @groups.register_group_score("first-channels")
    def first(module, m, size, stats):  # prefers low channel indices: a plan keeps the first ones
        return -torch.arange(size, dtype=torch.float64) if m.role == "out" else torch.zeros(size, dtype=torch.float64)

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    result = relprune.prune_groups(model, torch.randn(2, 6), 0.5, criterion="first-channels", budget="params")
    assert result.model[0].out_features < 8
    torch.testing.assert_close(result.model[0].weight, model[0].weight[: result.model[0].out_features])
    assert groups.GROUP_SCORES["l2"].statistics == () and groups.GROUP_SCORES["rc"].statistics == ("relative_mean",)
