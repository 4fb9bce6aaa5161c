"""Shrunk models compute exactly what the masked ones do, and refuse what they cannot do exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprune
from relprune.deploy.shrink import shrink
from relprune.experiments.models import build_model


def _kill_units(model, fraction=0.3, seed=0):
    """Masks that empty whole rows (no input) and whole columns (no output), plus random zeros."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, layer in relprune.core.layers.prunable_layers(model).items():
        w = layer.weight
        mask = torch.rand(w.shape, generator=g) > 0.5
        rows = torch.rand(w.shape[0], generator=g) < fraction
        mask[rows] = False
        cols = torch.rand(w.shape[1], generator=g) < fraction
        mask[:, cols] = False
        masks[name] = mask
    relprune.apply_masks(model, masks)
    return masks


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "vgg-small"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shrunk_equals_masked(name, seed):
    torch.manual_seed(seed)
    model = build_model(name, (1, 28, 28), 10).double()
    _randomise_bn(model)
    _kill_units(model, seed=seed)
    model.eval()
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    small, report = shrink(model, x)
    torch.testing.assert_close(small(x), model(x), rtol=1e-10, atol=1e-10)
    assert report.params_after < report.params_before
    assert any(k < t for k, t in report.kept_units.values())


def test_constant_units_folded_into_next_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[0].weight[1] = 0  # unit 1 outputs tanh(b_1): a constant, folded forward
    x = torch.randn(8, 4, dtype=torch.float64)
    small, report = shrink(model, x)
    assert report.kept_units["0"] == (4, 5)
    torch.testing.assert_close(small(x), model(x))


def test_padded_conv_keeps_a_nonzero_constant_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1)).double()
    with torch.no_grad():
        model[0].weight[2] = 0
        model[0].bias[2] = 0.5  # tanh(0.5) != 0 and the next conv pads with zeros: not exact to fold
        model[2].weight[:, 0] = 0  # channel 0 feeds nothing: removed
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    small, report = shrink(model, x)
    assert report.kept_units["0"] == (2, 3)
    torch.testing.assert_close(small(x), model(x))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class ResBlock(nn.Module):
    """A residual conv block with a 1x1 projection shortcut read by a grouped convolution, a concatenation,
    and a depthwise convolution before a classifier: every coupling the graph follows."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.side = nn.Conv2d(8, 4, 1)
        self.mix = nn.Conv2d(12, 10, 1)
        self.depthwise = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.head = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        r = torch.relu(self.conv1(h) + self.proj(h))
        c = torch.cat([torch.relu(self.grouped(r)), self.side(h)], dim=1)
        d = torch.relu(self.depthwise(torch.relu(self.mix(c))))
        return self.head(torch.flatten(d, 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_residual_concat_grouped_and_depthwise_nets_shrink_to_the_same_outputs(seed):
    torch.manual_seed(seed)
    model = ResBlock().double()
    _randomise_bn(model)
    _kill_units(model, fraction=0.4, seed=seed)
    model.eval()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    small, report = shrink(model, x)
    torch.testing.assert_close(small(x), model(x), rtol=1e-10, atol=1e-10)
    assert report.params_after < report.params_before
    grouped = small.grouped
    assert grouped.in_channels % grouped.groups == 0 and grouped.out_channels % grouped.groups == 0
    assert small.depthwise.groups == small.depthwise.in_channels == small.depthwise.out_channels
    inner = [r for r in report.refused if "output" not in r[1] and "input" not in r[1]]
    assert not inner, inner  # every inner group can shrink


def test_a_residual_channel_goes_only_when_every_layer_of_its_group_lets_it():
    model = nn.Sequential(nn.Linear(3, 4))
    model.add_module("block", Residual())
    model.add_module("out", nn.Linear(4, 2))
    with torch.no_grad():
        model.out.weight[:, 1] = 0  # channel 1 of the residual stream feeds nothing downstream...
        model.block.fc.weight[:, 1] = 0  # ...nor the block's own layer: it can go from all of them
        model.out.weight[:, 2] = 0  # channel 2 still feeds block.fc: it stays
    x = torch.randn(6, 3)
    small, report = shrink(model, x)
    torch.testing.assert_close(small(x), model(x))
    assert report.kept_units["0"] == (3, 4) and report.kept_units["block.fc"] == (3, 4)


def test_channels_behind_a_layer_norm_are_left_whole_and_listed():
    mixed = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with torch.no_grad():
        mixed[2].weight[:, 0] = 0
    x = torch.randn(3, 4)
    small, report = shrink(mixed, x)
    assert report.kept_units["0"] == (4, 4)
    assert any("LayerNorm" in reason for _, reason in report.refused)
    torch.testing.assert_close(small(x), mixed(x))


def test_model_is_left_unchanged():
    model = build_model("lenet300", (1, 8, 8), 10)
    _kill_units(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shrink(model, torch.randn(2, 1, 8, 8))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("criterion", ["rc", "l1"])
@pytest.mark.parametrize("name", ["lenet300", "lenet5", "vgg-small"])
def test_structured_masks_over_the_graph_shrink_to_the_planned_sizes(name, criterion):
    from relprune.deploy.graph import DependencyGraph
    from relprune.deploy.groups import group_scores, structured_masks

    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10).eval()
    x = torch.randn(32, 1, 28, 28)
    stats = relprune.collect_stats(model, [x], statistics=["relative_mean"]) if criterion == "rc" else None
    graph = DependencyGraph(model, x)
    keep = {gi: torch.argsort(v)[v.numel() // 2:] for gi, v in group_scores(graph, stats, criterion).items()}
    relprune.apply_masks(model, structured_masks(graph, keep))
    small, report = shrink(model, x)
    for gi, kept in keep.items():
        producer = next(m.module for m in graph.groups[gi].members if m.role == "out")
        assert report.kept_units[producer][0] == len(kept)
    torch.testing.assert_close(small.eval()(x), model(x), rtol=1e-5, atol=1e-5)


class _TwoBlockResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.a(x))
        x = x + torch.relu(self.b(x))
        return self.head(x.mean((2, 3)))


def test_a_model_masked_by_torch_prune_shrinks_without_its_originals_and_masks():
    """torch.nn.utils.prune's layout (weight_orig, weight_mask, a pre-hook) is folded, never carried (issue 30)."""
    from torch.nn.utils import prune as torch_prune

    torch.manual_seed(0)
    model = _TwoBlockResidual().eval()
    dense_params = sum(p.numel() for p in model.parameters())
    for layer in (model.a, model.b, model.head):  # nothing reads residual channels 0-3 any more
        mask = torch.ones_like(layer.weight)
        mask[:, :4] = 0
        torch_prune.custom_from_mask(layer, "weight", mask)
    torch_prune.l1_unstructured(model.stem, "weight", amount=0.3)
    x = torch.randn(4, 1, 12, 12)
    small, report = shrink(model, x)
    names = [n for n, _ in small.named_parameters()] + [n for n, _ in small.named_buffers()]
    assert not [n for n in names if n.endswith(("_orig", "_mask"))]
    assert report.params_after < report.params_before == dense_params
    assert sum(p.numel() for p in small.parameters()) == report.params_after
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    assert hasattr(model.a, "weight_orig")  # the model given is unchanged
