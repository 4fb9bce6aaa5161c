"""Shrunk models compute exactly what the masked ones do, and refuse what they cannot do exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprune
from relprune.deploy.shrink import shrink
from relprune.errors import ShrinkError
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


def test_refuses_what_is_not_exact():
    chain = nn.Sequential()
    chain.add_module("fc", nn.Linear(4, 4))
    chain.add_module("block", Residual())
    with pytest.raises(ShrinkError, match=r"block \(Residual\)"):
        shrink(chain, torch.randn(2, 4))
    mixed = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ShrinkError, match="LayerNorm"):
        shrink(mixed, torch.randn(2, 4))
    small, _ = shrink(mixed, torch.randn(2, 4), allow_approximate=True)
    assert isinstance(small, nn.Sequential)


def test_model_is_left_unchanged():
    model = build_model("lenet300", (1, 8, 8), 10)
    _kill_units(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shrink(model, torch.randn(2, 1, 8, 8))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("criterion", ["rc", "l1"])
@pytest.mark.parametrize("name", ["lenet300", "lenet5", "vgg-small"])
def test_structured_pruning_removes_exactly_the_requested_count(name, criterion):
    from relprune.deploy.structured import prune_units, unit_pairs

    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10)
    x = torch.randn(32, 1, 28, 28)
    stats = relprune.collect_stats(model, [x], statistics=["relative_mean"]) if criterion == "rc" else None
    kept = prune_units(model, stats, 0.5, criterion=criterion)
    small, report = shrink(model, x)
    for layer, _ in unit_pairs(model):
        total = kept[layer].numel()
        assert int(kept[layer].sum()) == total - round(0.5 * total)
        assert report.kept_units[layer] == (int(kept[layer].sum()), total)
    model.eval()
    small.eval()
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_structured_rc_keeps_the_unit_that_carries_the_signal():
    from relprune.deploy.structured import unit_scores

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, 0.01, 0.5]]))
        model[2].bias.zero_()
    stats = relprune.collect_stats(model, [torch.rand(64, 3)], statistics=["relative_mean"])
    scores = unit_scores(model, stats)["0"]
    assert scores.argmax() == 0 and scores.argmin() == 1
