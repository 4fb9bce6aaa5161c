"""What a hostile new user tried on the vision commands and the public API (issue 23): every case
refused in one line or done right, and nothing replaced, half-written or left behind."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_run import run
from torch import nn

import relprune
from relprune.cli import main


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, message", [
    (["prune", "--checkpoint", "{m}", "--sparsity", "0.5", "--calib-samples", "64", "--out", "{m}"], "a model"),
    (["prune", "--checkpoint", "{m}", "--sparsity", "0.5", "--calib-samples", "64", "--out", "{p}"], "a model"),
    (["export", "--checkpoint", "{p}", "--out", "{e}"], "an export"),
])
def test_commands_refuse_to_replace_what_an_earlier_run_wrote(trained, tmp_path, capsys, argv, message):
    before = _digest(trained)
    code, err = run([a.format(m=trained / "model", p=trained / "pruned", e=trained / "export") for a in argv],
                     capsys)
    assert code == 1 and len(err.splitlines()) == 1 and message in err and "--overwrite" in err, err
    assert _digest(trained) == before


def test_overwrite_replaces_on_purpose(trained, tmp_path, capsys):
    target = tmp_path / "again"
    assert main(["export", "--checkpoint", str(trained / "pruned"), "--out", str(target)]) == 0
    assert run(["export", "--checkpoint", trained / "pruned", "--out", target], capsys)[0] == 1
    assert main(["export", "--checkpoint", str(trained / "pruned"), "--out", str(target), "--overwrite"]) == 0


def test_interrupted_fine_tune_leaves_no_empty_out(trained, tmp_path, capsys, monkeypatch):
    import relprune.experiments.training as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    code, err = run(["prune", "--checkpoint", trained / "model", "--sparsity", "0.5", "--calib-samples", "64",
                      "--finetune-epochs", "1", "--out", tmp_path / "new" / "pruned"], capsys)
    assert code == 130 and "nothing was saved" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag", ["--sparsities", "--seeds", "--models", "--regimes"])
def test_bench_with_an_empty_axis_writes_nothing(tmp_path, capsys, flag):
    code, err = run(["bench", flag, "", "--out", tmp_path / "b"], capsys)
    assert code == 1 and "is empty" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


def test_sparsity_zero_with_the_refit_changes_no_weight(trained, tmp_path):
    from relprune.experiments.experiment import load_model

    assert main(["prune", "--checkpoint", str(trained / "model"), "--sparsity", "0", "--calib-samples", "256",
                 "--out", str(tmp_path / "zero")]) == 0
    dense, _ = load_model(trained / "model")
    pruned, _ = load_model(tmp_path / "zero")
    relprune.make_permanent(pruned)
    after = pruned.state_dict()
    assert dense.state_dict().keys() == after.keys()
    for name, a in dense.state_dict().items():
        assert torch.equal(a, after[name]), name


@pytest.mark.parametrize("method", ["exact", "obs"])
def test_refit_leaves_rows_that_keep_every_weight_unchanged(method):
    from relprune.core.reconstruct import refit

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    x = torch.randn(50, 10, generator=g)
    x[:, 3] = 0  # an input that never fires
    keep = torch.ones_like(w, dtype=torch.bool)
    assert torch.equal(refit(w, x.T @ x, keep, method=method), w)
    keep[:3, ::2] = False
    new = refit(w, x.T @ x, keep, method=method)
    assert torch.equal(new[3:], w[3:]) and not torch.equal(new[:3], w[:3] * keep[:3])


@pytest.mark.parametrize("argv, code, message", [
    (["prune", "--checkpoint", "{m}", "--sparsity", "0.5", "--calib-samples", "1000000000", "--out", "{t}/x"],
     1, "holds"),
    (["prune", "--checkpoint", "{m}", "--sparsity", "0.5", "--seed", str(2**64), "--out", "{t}/x"], 2, "2\\^62"),
    (["train", "--dataset", "digits", "--seed", "-1", "--out", "{t}/x"], 2, "2\\^62"),
    (["bench", "--seeds", str(2**64), "--out", "{t}/x"], 1, "2\\^62"),
])
def test_out_of_range_numbers_are_one_line(trained, tmp_path, capsys, argv, code, message):
    got, err = run([a.format(m=trained / "model", t=tmp_path) for a in argv], capsys)
    assert got == code and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "x").exists()


def test_a_stored_architecture_that_asks_for_too_much_is_refused_before_allocating(trained, tmp_path, capsys):
    model = tmp_path / "huge"
    model.mkdir()
    (model / "model.safetensors").write_bytes((trained / "model" / "model.safetensors").read_bytes())
    info = json.loads((trained / "model" / "model.json").read_text())
    info["input_shape"] = [1, 10**6, 10**6]  # lenet300's first layer would take 4 TB
    (model / "model.json").write_text(json.dumps(info))
    code, err = run(["eval", "--checkpoint", model], capsys)
    assert code == 1 and "asks for" in err and len(err.splitlines()) == 1, err
    info["input_shape"] = [1, -8, 8]
    (model / "model.json").write_text(json.dumps(info))
    code, err = run(["eval", "--checkpoint", model], capsys)
    assert code == 1 and "positive whole numbers" in err, err


def test_an_export_whose_architecture_asks_for_too_much_is_refused(trained, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    for form in ("dense", "sparse"):
        src = trained / "export" / form / f"{form}.safetensors"
        with safe_open(str(src), framework="pt") as fh:
            meta = json.loads(fh.metadata()["relprune"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        first = next(item for item in meta["architecture"] if item["type"] == "Linear")
        first["args"]["in_features"] = 10**12
        bad = tmp_path / form
        bad.mkdir()
        save_file(tensors, str(bad / f"{form}.safetensors"), metadata={"relprune": json.dumps(meta)})
        code, err = run(["load", bad, "--no-evaluate"], capsys)
        assert code == 1 and len(err.splitlines()) == 1 and ("do not fit" in err or "not in the model" in err), err
    meta["architecture"][0]["args"] = {"no_such_argument": 1}
    save_file(tensors, str(bad / "sparse.safetensors"), metadata={"relprune": json.dumps(meta)})
    code, err = run(["load", bad, "--no-evaluate"], capsys)
    assert code == 1 and "no_such_argument" in err and "internal error" not in err, err


def test_a_sparse_export_whose_bitmask_and_values_disagree_is_refused(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = trained / "export" / "sparse" / "sparse.safetensors"
    with safe_open(str(src), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.endswith(".compressed"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(tmp_path / "sparse.safetensors"), metadata=metadata)
    with pytest.raises(relprune.IntegrityError, match="changed since relprune wrote it"):
        relprune.export.load_exported(tmp_path / "sparse.safetensors")
    with pytest.raises(relprune.CheckpointError, match="marks"):  # the decoder's own count check, unverified
        relprune.export.load_exported(tmp_path / "sparse.safetensors", verify=False)


@pytest.mark.parametrize("kind", ["bytes", "zip"])
def test_a_random_program_file_is_one_line(tmp_path, kind):
    import zipfile

    if kind == "bytes":
        (tmp_path / "program.pt2").write_bytes(bytes(range(256)) * 8)
    else:
        with zipfile.ZipFile(tmp_path / "program.pt2", "w") as z:
            z.writestr("archive/version", "1")
            z.writestr("archive/data.pkl", bytes(range(100)))
    done = subprocess.run([sys.executable, "-m", "relprune", "load", str(tmp_path), "--no-evaluate"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot load the program" in done.stderr


def test_an_exported_program_takes_any_batch_size(tmp_path):
    from relprune.experiments.models import resnet20

    model = resnet20().eval()
    path = relprune.export.export_program(model, torch.randn(1, 1, 28, 28), tmp_path)
    program, _ = relprune.export.load_exported(path)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-4, atol=1e-5)


class _Twice(nn.Module):
    """One Linear called at two places in the forward pass."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


def test_a_module_called_twice_is_refused_by_statistics_and_left_whole_by_the_graph():
    model = _Twice()
    with pytest.raises(relprune.CalibrationError, match="'a' is called more than once"):
        relprune.collect_stats(model, [torch.randn(16, 8)])
    graph = relprune.DependencyGraph(model, torch.randn(2, 8))
    for group in graph.groups:
        if any(m.module == "a" for m in group.members):
            assert any("called at 2 places" in r for r in group.refusals)


def test_ctrl_c_while_the_command_loads_is_one_line(tmp_path):
    """An interrupt during `import torch` (before any command runs) ends in one line, not a traceback."""
    code = (
        "import sys, importlib.abc\n"
        "class Stop(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Stop())\n"
        "sys.argv = ['relprune', '--help']\n"
        "from relprune.__main__ import main\n"
        "sys.exit(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "relprune: interrupted before any work; nothing was done"
