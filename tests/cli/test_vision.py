"""The relprune command end to end, and its argument errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from relprune.cli import main

COMMANDS = ["demo", "train", "prune", "eval", "bench", "explain", "export", "load"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--seed" in out and "default" in out
    # Only commands that write something take --out (eval and load only read).
    assert ("--out" in out) is (command not in ("eval", "load"))


def test_help_shows_each_commands_own_output_default(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "(default: runs/pruned)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["prune", "--sparsity", "abc"], "invalid"),
    (["train", "--epochs"], "expected one argument"),
    (["frobnicate"], "invalid choice"),
    (["bench", "--sparsities", "0.5,x"], "could not convert"),
])
def test_bad_arguments_exit_nonzero_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_library_errors_become_one_line(tmp_path, capsys):
    code = main(["eval", "--checkpoint", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and f"{tmp_path / 'none'} does not exist" in err
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x")])
    assert code == 1 and "--download" in capsys.readouterr().err


def test_train_prune_eval_explain_on_digits(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["train", "--dataset", "digits", "--epochs", "2", "--out", str(model)]) == 0
    assert (model / "model.safetensors").is_file()
    pruned = tmp_path / "pruned"
    assert main(["prune", "--checkpoint", str(model), "--sparsity", "0.7", "--finetune-epochs", "1",
                 "--out", str(pruned)]) == 0
    out = capsys.readouterr().out
    assert "sparsity 70.00%" in out and "fine-tuned" in out
    assert main(["prune", "--checkpoint", str(model), "--threshold", "0.5", "--criterion", "rc-ucb",
                 "--out", str(tmp_path / "thr")]) == 0
    assert main(["prune", "--checkpoint", str(model), "--sparsity", "0.8", "--criterion", "rc-flow",
                 "--out", str(tmp_path / "flow")]) == 0
    assert "sparsity 80.00%" in capsys.readouterr().out
    assert main(["prune", "--checkpoint", str(model), "--sparsity", "0.5", "--n-m", "2:4",
                 "--out", str(tmp_path / "bad")]) == 1
    assert main(["eval", "--checkpoint", str(pruned)]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["explain", "--checkpoint", str(model), "--calib-samples", "128", "--out", str(tmp_path / "ex")]) == 0
    assert (tmp_path / "ex" / "explain.png").stat().st_size > 0
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--pat", "entropy", "--pat-alpha", "0.1",
                 "--out", str(tmp_path / "pat")]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(pruned), "--out", str(tmp_path / "exp")]) == 0
    out = capsys.readouterr().out
    assert "dense (shrunk)" in out and "sparse (bitmask + values)" in out
    for form in ("dense", "masked", "sparse"):
        assert main(["load", str(tmp_path / "exp" / form)]) == 0
        assert "test accuracy" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(model), "--structured", "0.5", "--out", str(tmp_path / "st")]) == 0
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime

        assert main(["export", "--checkpoint", str(pruned), "--onnx", "--out", str(tmp_path / "onnx")]) == 0
        assert "onnx (shrunk)" in capsys.readouterr().out
        session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "onnx" / "model.onnx"))
        assert session.get_inputs()[0].shape[0] == "batch"


def test_prune_refits_by_default_only_when_the_model_is_used_as_pruned(tmp_path, capsys):
    """--reconstruct auto: the same weights as the API's prune(..., reconstruct=True) one-shot; no re-fit
    before a fine-tune or with bias compensation; 'none' and 'exact' as asked."""
    import relprune
    from relprune.defaults import DEFAULT_CRITERION
    from relprune.experiments.data import load_dataset
    from relprune.experiments.experiment import load_model
    from relprune.experiments.training import calibration_batches

    model = tmp_path / "model"
    assert main(["train", "--dataset", "digits", "--epochs", "2", "--out", str(model)]) == 0

    def pruned(name: str, *flags: str):
        assert main(["prune", "--checkpoint", str(model), "--sparsity", "0.6", "--calib-samples", "256",
                     "--out", str(tmp_path / name), *flags]) == 0
        net, info = load_model(tmp_path / name)
        return net, info.extra["method"]["reconstruct"]

    auto, refit = pruned("auto")
    assert refit is True
    dense, _ = load_model(model)
    calib = calibration_batches(load_dataset("digits").train, 256, seed=0)
    wanted = {*relprune.criteria.get_criterion(DEFAULT_CRITERION).statistics, "input_gram"}
    stats = relprune.collect_stats(dense, calib, statistics=sorted(wanted))
    relprune.prune(dense, stats, sparsity=0.6, criterion=DEFAULT_CRITERION, reconstruct=True)
    for (name, a), b in zip(auto.state_dict().items(), dense.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert pruned("plain", "--reconstruct", "none")[1] is False
    assert pruned("tuned", "--finetune-epochs", "1")[1] is False
    assert pruned("bc", "--bias-compensation")[1] is False
    assert pruned("tuned-refit", "--finetune-epochs", "1", "--reconstruct", "exact")[1] is True
    capsys.readouterr()


def test_demo_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, "-m", "relprune", "demo", "--epochs", "3", "--finetune-epochs", "1",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| method | 50% | 75% | 90% |" in result.stdout
    assert "magnitude" in result.stdout and "wanda" in result.stdout and "contrib-share" in result.stdout
    assert (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 0
