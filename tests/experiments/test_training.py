"""Training is deterministic, resumes exactly, and holds masks; models build and load."""

from __future__ import annotations

import itertools

import pytest
import torch

import relprune
from relprune.core.masks import mask_of
from relprune.errors import CheckpointError, RelpruneError
from relprune.experiments.data import load_dataset
from relprune.experiments.experiment import (
    Method,
    ModelInfo,
    iterative_prune,
    load_model,
    save_model,
    sparsity_schedule,
)
from relprune.experiments.models import MODELS, build_model
from relprune.experiments.training import TrainConfig, calibration_batches, evaluate, train


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    data.train = data.train.head(300)
    return data


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights(digits):
    cfg = TrainConfig(epochs=2, batch_size=32, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        m = build_model("lenet300", digits.input_shape, 10)
        train(m, digits, cfg)
        runs.append(_state(m))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k])


def test_interrupted_training_resumes_to_the_same_weights(digits, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=32, seed=1)
    torch.manual_seed(1)
    straight = build_model("vgg-small", digits.input_shape, 10)
    init = _state(straight)
    train(straight, digits, cfg)

    resumed = build_model("vgg-small", digits.input_shape, 10)
    resumed.load_state_dict(init)
    ckpt = tmp_path / "train.ckpt"
    train(resumed, digits, TrainConfig(**{**cfg.__dict__}), checkpoint=ckpt)  # full run writes checkpoints
    partial = build_model("vgg-small", digits.input_shape, 10)
    partial.load_state_dict(init)
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 2
    # Stop after epoch 1: rebuild that checkpoint by training 2 of 3 epochs, then resume.
    ckpt2 = tmp_path / "stop.ckpt"
    calls = {"n": 0}

    class Stop(Exception):
        pass

    def penalty():
        calls["n"] += 1
        if calls["n"] > 2 * ((len(digits.train) + 31) // 32):
            raise Stop
        return torch.zeros(())

    with pytest.raises(Stop):
        train(partial, digits, cfg, penalty=penalty, checkpoint=ckpt2)
    again = build_model("vgg-small", digits.input_shape, 10)
    history = train(again, digits, cfg, checkpoint=ckpt2)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for k, v in _state(straight).items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def test_checkpoint_with_other_config_is_refused(digits, tmp_path):
    m = build_model("lenet300", digits.input_shape, 10)
    train(m, digits, TrainConfig(epochs=1, batch_size=64), checkpoint=tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match=r"belongs to another run .*'epochs': \(1, 2\)"):
        train(m, digits, TrainConfig(epochs=2, batch_size=64), checkpoint=tmp_path / "c.ckpt")


def test_finetune_keeps_masks_and_iterative_reaches_target(digits):
    torch.manual_seed(0)
    m = build_model("lenet5", digits.input_shape, 10)
    train(m, digits, TrainConfig(epochs=1, batch_size=32))
    calib = calibration_batches(digits.train, 128)
    masks = iterative_prune(m, digits, calib, Method("rc"), 0.8, 2, TrainConfig(epochs=1, batch_size=32))
    assert masks.sparsity == pytest.approx(0.8, abs=0.01)
    for name, mask in masks.items():
        assert torch.all(m.get_submodule(name).weight[~mask] == 0)
    assert sparsity_schedule(0.75, 2) == pytest.approx([0.5, 0.75])


def test_model_files_round_trip_with_masks(digits, tmp_path):
    m = build_model("lenet300", digits.input_shape, 10)
    relprune.prune(m, None, sparsity=0.5, criterion="magnitude")
    info = ModelInfo("lenet300", "digits", list(digits.input_shape), 10, metrics={"test_acc": 0.5})
    save_model(m, info, tmp_path / "m")
    back, info2 = load_model(tmp_path / "m")
    assert info2 == info
    assert evaluate(back, digits.test) == evaluate(m, digits.test)
    assert relprune.current_masks(back).sparsity == pytest.approx(0.5, abs=0.01)
    (tmp_path / "m" / "model.json").write_text(info.__class__.__name__)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")


def test_models_forward_on_both_input_sizes():
    for name in MODELS:
        for shape in [(1, 28, 28), (1, 8, 8)]:
            assert build_model(name, shape, 10)(torch.zeros(2, *shape)).shape == (2, 10)


def test_user_model_factory():
    m = build_model("torch.nn:Identity", (1, 8, 8), 10)
    assert isinstance(m, torch.nn.Identity)
    with pytest.raises(RelpruneError, match="cannot load"):
        build_model("nope.nothing:f", (1, 8, 8), 10)
    with pytest.raises(RelpruneError, match="unknown model"):
        build_model("resnet", (1, 8, 8), 10)


def test_early_stopping_keeps_the_best_epoch_as_a_shorter_run_would_end(digits):
    """With patience, the model ends as a run stopped right after its best validation epoch."""
    torch.manual_seed(0)
    m = build_model("lenet300", digits.input_shape, 10)
    relprune.prune(m, None, sparsity=0.5, criterion="magnitude")
    start = _state(m)
    cfg = TrainConfig(epochs=8, batch_size=32, lr=3e-2, schedule="constant", patience=2, seed=1)
    history = train(m, digits, cfg)
    accs = [h["val_acc"] for h in history]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))
    assert len(history) == cfg.epochs or len(history) - 1 - best == cfg.patience
    assert evaluate(m, digits.val) == accs[best]
    ref = build_model("lenet300", digits.input_shape, 10)
    relprune.prune(ref, None, sparsity=0.5, criterion="magnitude")
    ref.load_state_dict(start)
    train(ref, digits, TrainConfig(epochs=best + 1, batch_size=32, lr=3e-2, schedule="constant", seed=1))
    for k, v in _state(ref).items():
        assert torch.equal(m.state_dict()[k], v), k
    layer = m.get_submodule("1")
    assert torch.all(layer.weight[~mask_of(layer).bool()] == 0)


def test_early_stopping_ends_when_validation_stops_improving(digits):
    m = build_model("lenet300", digits.input_shape, 10)
    history = train(m, digits, TrainConfig(epochs=10, batch_size=64, lr=0.0, patience=3))
    assert len(history) == 4  # epoch 1 is the best; three more without improvement


def test_old_checkpoint_without_new_settings_resumes(digits, tmp_path):
    m = build_model("lenet300", digits.input_shape, 10)
    ckpt = tmp_path / "c.ckpt"
    train(m, digits, TrainConfig(epochs=1, batch_size=64), checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["patience"], state["best"]
    torch.save(state, ckpt)
    history = train(m, digits, TrainConfig(epochs=1, batch_size=64), checkpoint=ckpt)
    assert len(history) == 1  # accepted as the same run (patience=0 is the default), nothing retrained


def test_cubic_schedule_is_zhu_and_gupta_by_hand():
    from relprune.experiments.experiment import cubic_schedule

    assert cubic_schedule(0.9, 3) == pytest.approx([0.9 * (1 - (2 / 3) ** 3), 0.9 * (1 - (1 / 3) ** 3), 0.9])
    assert cubic_schedule(0.8, 2, initial=0.4) == pytest.approx([0.8 - 0.4 / 8, 0.8])


def test_gradual_pruning_only_adds_to_the_mask_and_ends_at_the_target(digits):
    from relprune.experiments.experiment import gradual_prune

    torch.manual_seed(0)
    m = build_model("lenet300", digits.input_shape, 10)
    calib = calibration_batches(digits.train, 128)
    seen = []
    original = relprune.prune

    def spy(model, *a, **kw):
        masks = original(model, *a, **kw)
        recipe = a[1]  # prune(model, stats, recipe, ...): the recipe carries the step's sparsity
        seen.append((recipe.sparsity, {n: k.clone() for n, k in masks.items()}))
        return masks

    import relprune.experiments.experiment as ex
    ex.prune, saved = spy, ex.prune
    try:
        masks = gradual_prune(m, digits, calib, Method("rc"), 0.9, 4, TrainConfig(epochs=5, batch_size=32))
    finally:
        ex.prune = saved
    assert [s for s, _ in seen] == pytest.approx([0.9 * (1 - (1 - t / 4) ** 3) for t in (1, 2, 3, 4)])
    for (_, before), (_, after) in itertools.pairwise(seen):
        assert all(torch.all(after[n] <= before[n]) for n in before)  # nothing pruned comes back
    assert masks.sparsity == pytest.approx(0.9, abs=0.01)


def test_gradual_pruning_over_several_passes_trains_on_every_sample_once_per_pass(digits):
    import relprune.experiments.experiment as ex

    torch.manual_seed(0)
    m = build_model("lenet300", digits.input_shape, 10)
    calib = calibration_batches(digits.train, 64)
    seen: list[torch.Tensor] = []
    saved = ex.train

    def spy(model, data, cfg, **kw):
        seen.append(data.train.x)
        assert cfg.epochs == 1 and cfg.schedule == "constant" and cfg.augment == "crop"
        return saved(model, data, cfg, **kw)

    ex.train = spy
    try:
        masks = ex.gradual_prune(m, digits, calib, Method("magnitude"), 0.8, 5,
                                 TrainConfig(batch_size=64, augment="crop"), passes=3)
    finally:
        ex.train = saved
    assert len(seen) == 5
    rows = torch.cat(seen).flatten(1)
    assert len(rows) == 3 * len(digits.train)
    # The parts hold each training image exactly three times (duplicates in the data included).
    seen_rows, seen_counts = torch.unique(rows, dim=0, return_counts=True)
    data_rows, data_counts = torch.unique(digits.train.x.flatten(1), dim=0, return_counts=True)
    assert torch.equal(seen_rows, data_rows) and torch.equal(seen_counts, 3 * data_counts)
    assert masks.sparsity == pytest.approx(0.8, abs=0.01)
    with pytest.raises(RelpruneError, match="one pass"):
        ex.gradual_prune(m, digits, calib, Method("magnitude"), 0.8, 5, TrainConfig(), passes=0)
