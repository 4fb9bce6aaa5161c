"""prune(): budgets, masks through training and checkpoints, bias compensation, and bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import relprune
from relprune import (
    CalibrationError,
    LayerError,
    MissingLabelsError,
    NonFiniteActivationError,
    NoPrunableLayersError,
    SparsityError,
    StatsMismatchError,
)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def batches(shape=(16, 8), n=3, labels=False):
    out = [torch.randn(shape) for _ in range(n)]
    return [(x, torch.randint(0, 3, (shape[0],))) for x in out] if labels else out


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(m.training, len(m._forward_hooks), len(m._forward_pre_hooks), dict(m._parameters).keys())
         for m in model.modules()],
    )


def assert_unchanged(model, snap):
    state, modes = snap
    now_state, now_modes = snapshot(model)
    assert state.keys() == now_state.keys()
    for k in state:
        assert torch.equal(state[k], now_state[k]), k
    assert modes == now_modes


@pytest.mark.parametrize("scope", ["global", "layer", "row"])
@pytest.mark.parametrize("criterion", ["rc", "rc-ucb", "contrib-std", "contrib-share", "wanda", "ria",
                                       "magnitude", "random"])
def test_prune_hits_requested_sparsity(scope, criterion):
    model = mlp()
    stats = relprune.collect_stats(model, batches())
    masks = relprune.prune(model, stats, sparsity=0.75, criterion=criterion, scope=scope)
    total = sum(m.numel() for m in masks.values())
    assert abs(masks.sparsity - 0.75) <= 1 / total * len(masks) * 16
    for name, layer in dict(model.named_modules()).items():
        if name in masks:
            assert torch.all(layer.weight[~masks[name]] == 0)
    if scope == "global":
        assert int((~torch.cat([m.flatten() for m in masks.values()])).sum()) == round(0.75 * total)


def test_snip_needs_labels_and_works_with_them():
    model = mlp()
    snap = snapshot(model)
    unlabeled = relprune.collect_stats(model, batches())
    with pytest.raises(MissingLabelsError):
        relprune.prune(model, unlabeled, sparsity=0.5, criterion="snip")
    assert_unchanged(model, snap)
    labeled = relprune.collect_stats(model, batches(labels=True))
    masks = relprune.prune(model, labeled, sparsity=0.5, criterion="snip")
    assert math.isclose(masks.sparsity, 0.5, abs_tol=0.01)
    with pytest.raises(MissingLabelsError):
        relprune.collect_stats(mlp(), batches(), statistics=["weight_grad"])


def test_masks_survive_optimizer_steps_and_save_load():
    model = mlp()
    stats = relprune.collect_stats(model, batches())
    masks = relprune.prune(model, stats, sparsity=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for x in batches(n=3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for name, mask in masks.items():
        assert torch.all(model.get_submodule(name).weight[~mask] == 0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = mlp()
    relprune.load_state_dict(fresh, torch.load(buf))
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh(x), model(x))
    assert relprune.current_masks(fresh).sparsity == pytest.approx(masks.sparsity)
    relprune.make_permanent(fresh)
    assert not any(k.endswith("_mask") for k in fresh.state_dict())
    torch.testing.assert_close(fresh(x), model(x))


def test_pruning_again_only_adds_zeros():
    model = mlp()
    first = relprune.prune(model, None, sparsity=0.5, criterion="random", seed=1)
    second = relprune.prune(model, None, sparsity=0.7, criterion="random", seed=2)
    for n in first:
        assert torch.all(second[n] <= first[n])
    assert second.total - second.kept == round(0.7 * second.total)


def test_bias_compensation_keeps_mean_preactivation():
    model = mlp().double()
    data = [torch.randn(64, 8, dtype=torch.float64) + 1 for _ in range(2)]
    stats = relprune.collect_stats(model, data, liveness=False)
    x = torch.cat(data)
    before = model[2](torch.relu(model[0](x))).mean(0)
    relprune.prune(model, stats, sparsity=0.6, criterion="contrib-std", scope="layer", bias_compensation=True,
                   layers=["2"])
    after = model[2](torch.relu(model[0](x))).mean(0)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bias_compensation_gives_bias_free_layers_a_bias(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(8, 6, bias=False)).double()
        data = [torch.randn(32, 3, 8, dtype=torch.float64) + 1 for _ in range(2)]
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False)).double()
        data = [torch.randn(16, 3, 7, 7, dtype=torch.float64) + 1 for _ in range(2)]
    x = torch.cat(data)
    before = model(x).mean(tuple(i for i in range(model(x).dim()) if i != (1 if kind == "conv" else 2)))
    stats = relprune.collect_stats(model, data, liveness=False)
    relprune.prune(model, stats, sparsity=0.5, criterion="contrib-std", scope="layer", bias_compensation=True)
    assert isinstance(model[0].bias, nn.Parameter) and model[0].bias.shape == (model[0].weight.shape[0],)
    y = model(x)
    after = y.mean(tuple(i for i in range(y.dim()) if i != (1 if kind == "conv" else 2)))
    # The mean output over the calibration data is exactly the dense one (conv: away from the border,
    # every output position sees the same inputs' mean only on average, so compare per-channel means).
    torch.testing.assert_close(after, before)


def test_bias_added_for_compensation_is_removed_on_rollback(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))
    stats = relprune.collect_stats(model, [torch.randn(16, 8) + 1], liveness=False)
    import relprune.core.pruning as pruning_module

    def fail(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pruning_module, "apply_masks", fail)  # fails after the biases were added
    with pytest.raises(RuntimeError):
        relprune.prune(model, stats, sparsity=0.5, criterion="contrib-std", bias_compensation=True)
    assert model[0].bias is None and model[2].bias is None
    assert "bias" not in dict(model.named_parameters())


def test_threshold_mode_reports_achieved_sparsity():
    model = mlp()
    stats = relprune.collect_stats(model, batches())
    masks = relprune.prune(model, stats, threshold=0.5, criterion="rc-ucb")
    assert 0 < masks.sparsity < 1 and masks.threshold == 0.5
    for name, mask in masks.items():
        score = stats[name].relative_mean + stats[name].relative_std
        assert torch.all(score[~mask] < 0.5 / mask.shape[1])


def test_n_m_on_conv_and_linear():
    model = nn.Sequential(nn.Conv2d(4, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 4))
    stats = relprune.collect_stats(model, [torch.randn(3, 4, 4, 4)])
    masks = relprune.prune(model, stats, n_m="2:4")
    for mask in masks.values():
        rows = mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask
        assert torch.all(rows.reshape(-1, 4).sum(1) == 2)


def test_report_table():
    model = mlp()
    masks = relprune.prune(model, None, sparsity=0.5, criterion="magnitude", scope="layer")
    rows = masks.report()
    assert [r.name for r in rows] == ["0", "2", "4"]
    assert rows[0].shape == (16, 8) and rows[0].kept == 64 and rows[0].sparsity == 0.5
    table = masks.table()
    assert "total" in table and "50.00%" in table
    assert relprune.sparsity_report(model)[0].kept == 64


# -- bad input: clear errors, nothing lost ------------------------------------

def _bad_calls():
    return {
        "absent layer": (lambda m: relprune.collect_stats(m, batches(), layers=["nope"]), LayerError),
        "unsupported layer": (lambda m: relprune.collect_stats(m, batches(), layers=["1"]), LayerError),
        "empty iterable": (lambda m: relprune.collect_stats(m, []), CalibrationError),
        "empty batch": (lambda m: relprune.collect_stats(m, [torch.zeros(0, 8)]), CalibrationError),
        "nan batch": (lambda m: relprune.collect_stats(m, [torch.full((4, 8), math.nan)]),
                      NonFiniteActivationError),
        "not a tensor": (lambda m: relprune.collect_stats(m, ["text"]), CalibrationError),
        "sparsity 1": (lambda m: relprune.prune(m, None, sparsity=1.0, criterion="magnitude"), SparsityError),
        "sparsity negative": (lambda m: relprune.prune(m, None, sparsity=-0.1, criterion="magnitude"),
                              SparsityError),
        "n_m not dividing": (lambda m: relprune.prune(m, None, n_m="2:3", criterion="magnitude"), SparsityError),
        "no budget": (lambda m: relprune.prune(m, None, criterion="magnitude"), SparsityError),
        "two budgets": (lambda m: relprune.prune(m, None, sparsity=0.5, threshold=1.0, criterion="rc"),
                        SparsityError),
        "threshold with magnitude": (lambda m: relprune.prune(m, None, threshold=1.0, criterion="magnitude"),
                                     SparsityError),
        "stats of another model": (lambda m: relprune.prune(
            m, relprune.collect_stats(nn.Sequential(nn.Linear(8, 5)), batches()), sparsity=0.5),
            StatsMismatchError),
        "data criterion without stats": (lambda m: relprune.prune(m, None, sparsity=0.5, criterion="rc"),
                                         relprune.RelpruneError),
        "labels needed": (lambda m: relprune.prune(m, relprune.collect_stats(m, batches()), sparsity=0.5,
                                                   criterion="snip"), MissingLabelsError),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_input_raises_clearly_and_changes_nothing(case):
    call, error = _bad_calls()[case]
    model = mlp()
    relprune.prune(model, None, sparsity=0.3, criterion="random")  # pre-existing masks must survive too
    model.train()
    snap = snapshot(model)
    with pytest.raises(error) as info:
        call(model)
    assert str(info.value)
    assert_unchanged(model, snap)


def test_nan_names_the_layer():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = math.inf
    with pytest.raises(NonFiniteActivationError, match="'4'"):
        relprune.collect_stats(model, batches())


def test_no_prunable_layers():
    with pytest.raises(NoPrunableLayersError):
        relprune.collect_stats(nn.Sequential(nn.ReLU()), batches())


def test_failure_while_applying_rolls_back(monkeypatch):
    model = cnn()
    stats = relprune.collect_stats(model, [torch.randn(4, 2, 4, 4)])
    relprune.prune(model, stats, sparsity=0.2, criterion="magnitude")
    snap = snapshot(model)
    import relprune.core.pruning as pruning

    real = pruning.apply_masks

    def half_then_fail(m, masks):
        real(m, dict(list(masks.items())[:1]))
        raise RuntimeError("disk full")

    monkeypatch.setattr(pruning, "apply_masks", half_then_fail)
    with pytest.raises(RuntimeError):
        relprune.prune(model, stats, sparsity=0.6, criterion="magnitude", bias_compensation=False)
    assert_unchanged(model, snap)


def test_checkpoint_from_another_model():
    with pytest.raises(relprune.CheckpointError, match="shape mismatch"):
        relprune.load_state_dict(mlp(), nn.Sequential(nn.Linear(8, 15), nn.ReLU(), nn.Linear(15, 12), nn.ReLU(),
                                                      nn.Linear(12, 4)).state_dict())


# -- what a new user tripped over (issue 12) -----------------------------------------------------

def test_loaded_pruned_model_reports_its_sparsity_before_any_forward():
    model = mlp()
    relprune.prune(model, None, sparsity=0.75, criterion="magnitude")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = mlp()
    relprune.load_state_dict(fresh, torch.load(buf))
    rows = relprune.sparsity_report(fresh)
    assert sum(r.kept for r in rows) == relprune.current_masks(model).kept
    for name, layer in relprune.layers.prunable_layers(fresh).items():
        assert torch.equal(layer.weight, dict(model.named_modules())[name].weight)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x)[0].mean(1))


def test_nan_weights_are_refused_and_model_unchanged():
    model = mlp()
    stats = relprune.collect_stats(model, batches())
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for criterion in ("rc", "magnitude"):
        with pytest.raises(relprune.RelpruneError, match=r"\['2'\].*NaN"):
            relprune.prune(model, stats if criterion == "rc" else None, sparsity=0.5, criterion=criterion)
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True, rtol=0, atol=0)


def test_statistics_of_other_weights_are_refused_where_they_cannot_be_rebased():
    data = batches()
    other = mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    stats = relprune.collect_stats(other, data)  # same shapes, other weights
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(StatsMismatchError, match="other weights"):
        relprune.prune(model, stats, sparsity=0.5, criterion="rc")
    assert_unchanged(model, snap)


def test_input_moment_statistics_are_rebased_on_current_weights():
    data = batches()
    stats = relprune.collect_stats(mlp(), data, liveness=False, statistics=["contribution_std"])
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(-2.0)
    fresh = relprune.collect_stats(model, data, liveness=False, statistics=["contribution_std"])
    a, b = relprune.copy_model(model), relprune.copy_model(model)
    # The first layer's inputs are the data, so re-basing its statistics on new weights is exact.
    with pytest.warns(UserWarning, match=r"layers \['0'\] changed"):
        ma = relprune.prune(a, stats, sparsity=0.6, criterion="contrib-std", layers=["0"])
    mb = relprune.prune(b, fresh, sparsity=0.6, criterion="contrib-std", layers=["0"])
    assert torch.equal(ma["0"], mb["0"])


def test_pruning_again_with_the_same_statistics_is_allowed():
    model = mlp()
    stats = relprune.collect_stats(model, batches())
    relprune.prune(model, stats, sparsity=0.5, criterion="rc")
    masks = relprune.prune(model, stats, sparsity=0.75, criterion="rc")
    assert masks.sparsity == pytest.approx(0.75, abs=0.01)


def test_threshold_that_empties_a_layer_is_refused():
    model = mlp()
    stats = relprune.collect_stats(model, batches())
    snap = snapshot(model)
    with pytest.raises(SparsityError, match="removes every weight"):
        relprune.prune(model, stats, threshold=1000.0, criterion="rc")
    assert_unchanged(model, snap)
