"""Masks are parametrisations: they hold on every read of the weight, through training, copies and checkpoints,
and checkpoints in torch.nn.utils.prune's layout (what relprune wrote before) load into the same masks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import relprune
from relprune.core.masks import is_masked, load_state_dict, make_permanent, mask_of, original_weight


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_a_checkpoint_in_torch_prunes_layout_loads_into_the_same_masks():
    old = mlp()
    torch_prune.l1_unstructured(old[0], "weight", amount=0.5)  # weight_orig + weight_mask, as relprune wrote
    state = old.state_dict()
    assert "0.weight_orig" in state and "0.weight_mask" in state
    new = mlp()
    load_state_dict(new, state)
    assert is_masked(new[0]) and torch.equal(mask_of(new[0]), old[0].weight_mask)
    x = torch.randn(5, 6)
    torch.testing.assert_close(new(x), old(x))


def test_masks_hold_through_training_copies_and_their_own_state_dict():
    model = mlp()
    x = torch.randn(16, 6)
    relprune.prune(model, relprune.collect_stats(model, [x]), sparsity=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    for layer in (model[0], model[2]):
        assert torch.all(layer.weight[~mask_of(layer).bool()] == 0)
        assert original_weight(layer) is layer.parametrizations.weight.original
    clone = copy.deepcopy(model)
    make_permanent(clone)  # removing the copy's masks leaves the original's in place
    assert is_masked(model[0]) and not is_masked(clone[0])
    torch.testing.assert_close(clone(x), model(x))
    fresh = mlp()
    load_state_dict(fresh, model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))
    assert relprune.current_masks(fresh).sparsity == relprune.current_masks(model).sparsity


def test_statistics_stay_valid_when_masks_are_applied_and_go_stale_when_weights_change():
    model = mlp()
    x = torch.randn(16, 6)
    stats = relprune.collect_stats(model, [x])
    relprune.prune(model, stats, sparsity=0.3, reconstruct=False)
    relprune.prune(model, stats, sparsity=0.5, reconstruct=False)  # the same statistics, a second budget
    with torch.no_grad():
        original_weight(model[0]).add_(1.0)
    with pytest.raises(relprune.StatsMismatchError, match=r"other weights|changed in place"):
        relprune.prune(model, stats, sparsity=0.6, reconstruct=False)


def test_loss_gradients_of_a_masked_model_are_those_of_its_effective_weights():
    model = mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    relprune.prune(model, relprune.collect_stats(model, [x]), sparsity=0.5, reconstruct=False)
    plain = make_permanent(copy.deepcopy(model))
    masked = relprune.collect_stats(model, [(x, y)], statistics=["weight_grad"])
    dense = relprune.collect_stats(plain, [(x, y)], statistics=["weight_grad"])
    for name in ("0", "2"):
        assert masked[name].weight_grad.abs().sum() > 0
        torch.testing.assert_close(masked[name].weight_grad, dense[name].weight_grad)
