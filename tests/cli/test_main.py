"""Hostile input to the relprune command: every failure is one line, a non-zero exit, and no file changed."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from cli_run import run as _run

from relprune.cli import main
from relprune.core.masks import is_masked, mask_of, original_weight
from relprune.experiments.data import load_dataset
from relprune.experiments.experiment import load_model
from relprune.experiments.models import build_model
from relprune.experiments.training import TrainConfig, train


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# (argv with {m} = trained model, {p} = pruned model, {t} = a fresh temporary folder), exit code, message
CASES = [
    (["prune", "--checkpoint", "{m}", "--calib-samples", "0", "--sparsity", "0.5"], 2, "positive"),
    (["train", "--dataset", "digits", "--batch-size", "0", "--out", "{t}/x"], 2, "positive"),
    (["train", "--dataset", "digits", "--lr", "-0.1", "--out", "{t}/x"], 2, "positive"),
    (["train", "--dataset", "digits", "--epochs", "0", "--out", "{t}/x"], 2, "positive"),
    (["train", "--dataset", "digits", "--pat", "entropyy", "--out", "{t}/x"], 2, "choose from"),
    (["train", "--dataset", "digits", "--pat-warmup", "2", "--out", "{t}/x"], 2, r"\[0, 1\]"),
    (["train", "--dataset", "digits", "--model", "lenet3000", "--out", "{t}/x"], 1, "unknown model"),
    (["train", "--dataset", "digits", "--model", "nosuchpkg:make", "--out", "{t}/x"], 1, "cannot load model"),
    (["train", "--dataset", "digits", "--out", "/dev/null/x"], 1, "cannot be written"),
    (["train", "--dataset", "digits", "--epochs", "1", "--out", "{m}"], 1, "already holds a trained model"),
    (["prune", "--checkpoint", "{m}", "--n-m", "abc"], 2, "N:M pattern must be two whole numbers"),
    (["prune", "--checkpoint", "{m}", "--n-m", "4:2"], 2, "0 < N < M"),
    (["prune", "--checkpoint", "{m}", "--sparsity", "1.0"], 2, "remove every weight"),
    (["prune", "--checkpoint", "{m}", "--sparsity", "nan"], 2, r"\[0, 1\)"),
    (["prune", "--checkpoint", "{m}", "--criterion", "nope", "--sparsity", "0.5"], 2, "unknown criterion"),
    (["prune", "--checkpoint", "{m}", "--scope", "rows", "--sparsity", "0.5"], 2, "choose from"),
    (["prune", "--checkpoint", "{m}", "--threshold", "0.5", "--criterion", "magnitude"], 1, "not on that scale"),
    (["prune", "--checkpoint", "{m}", "--sparsity", "0.5", "--reconstruct", "exact", "--bias-compensation",
      "--out", "{t}/x"], 1, "correct it twice"),
    (["prune", "--checkpoint", "{m}", "--sparsity", "0.5", "--reconstruct", "yes"], 2, "choose from"),
    (["prune", "--checkpoint", "{m}", "--threshold", "-1", "--criterion", "rc"], 2, "positive"),
    (["prune", "--checkpoint", "{m}", "--threshold", "1000", "--criterion", "rc", "--calib-samples", "64",
      "--out", "{t}/thr"], 1, "removes every weight"),
    (["prune", "--checkpoint", "{m}", "--sparsity", "0.5", "--threshold", "0.5"], 1, "one budget"),
    (["prune", "--checkpoint", "{m}/typo", "--sparsity", "0.5", "--out", "{t}/x"], 1, r"typo does not exist"),
    (["prune", "--checkpoint", "{m}/model.json.bak", "--sparsity", "0.5", "--out", "{t}/x"], 1, "does not exist"),
    (["prune", "--checkpoint", "{m}", "--sparsity", "0.5", "--out", "{m}/model.json"], 1, "is a file"),
    (["prune", "--checkpoint", "{m}", "--sparsity", "0.5", "--finetune-lr", "0", "--out", "{t}/x"], 2,
     "positive"),
    (["eval", "--checkpoint", "{t}"], 1, "does not hold model.json"),
    (["eval", "--checkpoint", "{m}", "--dataset", "cifar"], 1, "unknown dataset|dataset"),
    (["explain", "--checkpoint", "{m}", "--calib-samples", "-5"], 2, "positive"),
    (["export", "--checkpoint", "{p}", "--structured", "1.5"], 2, r"\[0, 1\)"),
    (["export", "--checkpoint", "{p}", "--out", "{m}/model.json"], 1, "is a file"),
    (["load", "{t}/nothing"], 1, "nothing"),
    (["bench", "--config", "{t}/missing.toml"], 1, "does not exist"),
    (["bench", "--liveness", "flase"], 2, "not a boolean"),
    (["bench", "--sparsities", "0.5,1.5", "--out", "{t}/b"], 1, r"outside \[0, 1\)"),
    (["bench", "--epochs", "0", "--out", "{t}/b"], 1, "at least 1"),
    (["demo", "--epochs", "0"], 2, "positive"),
]


@pytest.mark.parametrize("argv, code, message", CASES, ids=[" ".join(c[0][:4]) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(trained, tmp_path, capsys, argv, code, message):
    before = _digest(trained)
    argv = [a.format(m=trained / "model", p=trained / "pruned", t=tmp_path) for a in argv]
    got, err = _run(argv, capsys)
    assert got == code, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and re.search(message, err), err
    assert _digest(trained) == before


def test_bench_config_that_is_not_toml_or_has_wrong_types(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("models = [lenet300\n")
    code, err = _run(["bench", "--config", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "not valid TOML" in err and len(err.splitlines()) == 1
    bad.write_text('epochs = "ten"\nsparsities = [0.5, "x"]\n')
    code, err = _run(["bench", "--config", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "epochs = 'ten'" in err and "sparsities" in err


def test_corrupt_training_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.ckpt").write_bytes(b"not a checkpoint at all")
    code, err = _run(["train", "--dataset", "digits", "--epochs", "1", "--out", str(out)], capsys)
    assert code == 1 and "not a readable training checkpoint" in err and len(err.splitlines()) == 1
    assert (out / "train.ckpt").read_bytes() == b"not a checkpoint at all"


@pytest.mark.parametrize("changed, flag", [
    (["--model", "lenet5"], "'model'"),
    (["--pat", "l1", "--pat-alpha", "0.01"], "'pat'"),
])
def test_resuming_another_run_is_refused(tmp_path, capsys, changed, flag):
    """An interrupted lenet300 run (epoch 1 of 2 saved) must not be resumed by a different command."""
    data = load_dataset("digits")
    out = tmp_path / "run"
    model = build_model("lenet300", data.input_shape, data.num_classes)
    run = {"model": "lenet300", "dataset": "digits", "pat": "none", "pat_alpha": 0.0, "pat_warmup": 0.2}
    train(model, data, TrainConfig(epochs=1), checkpoint=out / "train.ckpt", run=run)
    before = (out / "train.ckpt").read_bytes()
    code, err = _run(["train", "--dataset", "digits", "--epochs", "1", "--out", str(out), *changed], capsys)
    assert code == 1 and "belongs to another run" in err and flag in err
    assert (out / "train.ckpt").read_bytes() == before


def test_train_says_it_resumes_and_prints_each_epoch(tmp_path, capsys):
    data = load_dataset("digits")
    out = tmp_path / "run"
    model = build_model("lenet300", data.input_shape, data.num_classes)
    run = {"model": "lenet300", "dataset": "digits", "pat": "none", "pat_alpha": 0.0, "pat_warmup": 0.2}
    train(model, data, TrainConfig(epochs=2), checkpoint=out / "train.ckpt", run=run)  # both epochs saved
    state = torch.load(out / "train.ckpt", weights_only=True)
    state["epoch"], state["history"] = 0, state["history"][:1]  # as if stopped after epoch 1
    torch.save(state, out / "train.ckpt")
    assert main(["train", "--dataset", "digits", "--epochs", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "after epoch 1 of 2" in err
    assert "train epoch 2/2: loss" in err and "validation accuracy" in err
    assert not (out / "train.ckpt").exists()


def test_pruned_model_reports_its_sparsity_when_evaluated_and_loaded(trained, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(trained / "pruned")]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert total.split()[-1] == "70.00%"
    assert main(["export", "--checkpoint", str(trained / "pruned"), "--out", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    assert main(["load", str(tmp_path / "exp" / "masked")]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert total.split()[-1] == "70.00%"


def test_pruned_checkpoint_is_not_twice_the_dense_size(trained):
    dense = (trained / "model" / "model.safetensors").stat().st_size
    pruned = (trained / "pruned" / "model.safetensors").stat().st_size
    assert pruned < 1.3 * dense  # float32 weights + one byte of mask per weight, not weight_orig + a float mask
    model, _ = load_model(trained / "pruned")
    masked = [m for m in model.modules() if is_masked(m)]
    assert masked and all(torch.equal(m.weight, original_weight(m) * mask_of(m)) for m in masked)


def test_n_m_names_layers_left_dense_and_reports_whole_model_sparsity(trained, tmp_path, capsys):
    # lenet300 on 8x8 digits: layers 1, 3, 5 with fan-ins 64, 300, 100; only 300 is a multiple of 3.
    # No re-fit: as SparseGPT's, it zeroes kept weights on inputs no calibration sample lights up.
    assert main(["prune", "--checkpoint", str(trained / "model"), "--n-m", "2:3", "--calib-samples", "64",
                 "--reconstruct", "none", "--out", str(tmp_path / "nm")]) == 0
    out = capsys.readouterr().out
    assert "left dense (inputs not a multiple of 3): 1, 5" in out
    share = float(re.search(r"sparsity ([\d.]+)% of all prunable weights", out).group(1))
    assert share == pytest.approx(100 * 10000 / 50200, abs=0.01)  # a third of layer 3's 30,000 weights


def test_dataset_that_does_not_fit_the_model_is_refused_before_work(trained, shared_data, capsys):
    code, err = _run(["eval", "--checkpoint", str(trained / "model"), "--dataset", "mnist",
                      "--data-dir", str(shared_data)], capsys)
    assert code == 1 and "mnist has inputs [1, 28, 28]" in err and "takes [1, 8, 8]" in err
    assert len(err.splitlines()) == 1


def test_eval_names_the_dataset_it_used(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained / "model"), "--dataset", "digits"]) == 0
    assert "on digits:" in capsys.readouterr().out


def test_interrupt_before_anything_is_saved_does_not_promise_a_resume(trained, tmp_path, capsys, monkeypatch):
    import relprune.experiments.experiment as experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "gather", interrupted)
    code, err = _run(["prune", "--checkpoint", str(trained / "model"), "--sparsity", "0.5",
                      "--out", str(tmp_path / "p")], capsys)
    assert code == 130 and "nothing was saved" in err and "resume" not in err


def test_full_disk_is_one_line(trained, tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "p" / ".model.safetensors.tmp"))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(safetensors.torch, "save", full)
    code, err = _run(["prune", "--checkpoint", str(trained / "model"), "--sparsity", "0.5",
                      "--calib-samples", "64", "--out", str(tmp_path / "p")], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "No space left on device" in err
    assert not (tmp_path / "p" / "model.safetensors").exists()
    assert not (tmp_path / "p").exists()  # no temporary file left, and the folder the command made is gone


def test_eval_on_another_dataset_names_the_one_used(tmp_path, shared_data, capsys):
    from relprune.experiments.experiment import ModelInfo, save_model

    model = build_model("lenet300", (1, 28, 28), 10)
    save_model(model, ModelInfo("lenet300", "mnist", [1, 28, 28], 10), tmp_path / "m")
    assert main(["eval", "--checkpoint", str(tmp_path / "m"), "--dataset", "fashion-mnist",
                 "--data-dir", str(shared_data)]) == 0
    assert "lenet300 on fashion-mnist:" in capsys.readouterr().out


def test_criterion_help_lists_the_names(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "contrib-share" in out and "wanda" in out and "see relprune.CRITERIA" not in out


def test_training_checkpoint_with_a_pickled_object_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "optimizer": {}, "epoch": 0, "history": [], "payload": Path("x")},
               out / "train.ckpt")
    code, err = _run(["train", "--dataset", "digits", "--epochs", "1", "--out", str(out)], capsys)
    assert code == 1 and "not a readable training checkpoint" in err
