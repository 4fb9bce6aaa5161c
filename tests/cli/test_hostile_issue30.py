"""Issue 30's vision-side cases: exports replaced whole or not at all, changed weights refused, modes kept."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import relprune
from relprune.cli import main
from relprune.core import files


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit(143)])
def test_an_interrupted_export_overwrite_leaves_the_earlier_export_whole(trained, tmp_path, capsys, monkeypatch,
                                                                          stop):
    import relprune.deploy.export as export

    out = tmp_path / "exp"
    assert main(["export", "--checkpoint", str(trained / "pruned"), "--out", str(out)]) == 0
    before = _digest(out)
    real = export.export_sparse

    def dies_after_writing(*args, **kwargs):  # dense/ and masked/ are written by then
        real(*args, **kwargs)
        raise stop

    monkeypatch.setattr(export, "export_sparse", dies_after_writing)
    code, _ = _run(["export", "--checkpoint", trained / "pruned", "--out", out, "--overwrite"], capsys)
    assert code in (130, 143)
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no staging folder left beside it


def test_an_interrupted_fresh_export_leaves_nothing_and_the_rerun_works(trained, tmp_path, monkeypatch):
    import relprune.deploy.export as export

    out = tmp_path / "new" / "exp"
    monkeypatch.setattr(export, "export_sparse", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["export", "--checkpoint", str(trained / "pruned"), "--out", str(out)]) == 130
    assert not (tmp_path / "new").exists()  # the folder the command created is gone too
    monkeypatch.undo()
    assert main(["export", "--checkpoint", str(trained / "pruned"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dense", "masked", files.MANIFEST, "sparse"]


def test_an_export_into_a_folder_of_other_files_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = _run(["export", "--checkpoint", trained / "pruned", "--out", out, "--overwrite"], capsys)
    assert code == 1 and "not an export (notes.txt)" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _swap_two_bits(path: Path, key: str) -> None:
    tensors = load_file(str(path))
    bits = np.unpackbits(tensors[key].numpy(), axis=-1, bitorder="little")
    row = bits.reshape(bits.shape[0], -1)[0] if bits.ndim > 1 else bits
    on, off = int(np.flatnonzero(row)[0]), int(np.flatnonzero(row == 0)[0])
    row[on], row[off] = 0, 1
    tensors[key] = torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little"))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    save_file(tensors, str(path), metadata=metadata)


def test_two_bits_swapped_in_a_sparse_export_are_refused(trained, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", "--checkpoint", str(trained / "pruned"), "--out", str(out)]) == 0
    path = out / "sparse" / "sparse.safetensors"
    key = next(k for k in load_file(str(path)) if k.endswith(".bitmask"))
    _swap_two_bits(path, key)
    with pytest.raises(relprune.IntegrityError, match="changed since relprune wrote it"):
        relprune.export.load_exported(path)
    relprune.export.load_exported(path, verify=False)  # the counts still agree: only the hash can tell
    code, err = _run(["load", out / "sparse", "--no-evaluate"], capsys)
    assert code == 1 and "--no-verify-weights" in err and len(err.splitlines()) == 1
    assert _run(["load", out / "sparse", "--no-evaluate", "--no-verify-weights"], capsys)[0] == 0


def test_a_changed_model_file_is_refused(trained, tmp_path, capsys):
    from relprune.experiments.experiment import load_model

    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("model.safetensors", "model.json"):
        (folder / name).write_bytes((trained / "pruned" / name).read_bytes())
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(relprune.IntegrityError, match=key.replace(".", r"\.")):
        load_model(folder)
    load_model(folder, verify=False)
    code, err = _run(["eval", "--checkpoint", folder], capsys)
    assert code == 1 and "--no-verify-weights" in err


def test_exports_and_models_follow_the_umask(trained, tmp_path):
    before = os.umask(0o027)
    try:
        assert main(["export", "--checkpoint", str(trained / "pruned"), "--out", str(tmp_path / "exp")]) == 0
    finally:
        os.umask(before)
    for p in [tmp_path / "exp", *(tmp_path / "exp").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o750 if p.is_dir() else 0o640), p


def test_atomic_file_leaves_nothing_when_writing_fails(tmp_path):
    with pytest.raises(RuntimeError), files.atomic_file(tmp_path / "x.bin") as fh:
        fh.write(b"half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    files.atomic_write_text("whole", tmp_path / "x.txt")
    assert (tmp_path / "x.txt").read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_a_manifest_that_lists_a_file_outside_its_folder_is_refused(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / files.MANIFEST).write_text('{"sha256": {"../secret": "00"}}')
    with pytest.raises(relprune.IntegrityError, match="outside the folder"):
        files.verify_manifest(tmp_path / "f")
    (tmp_path / "f" / files.MANIFEST).write_text("[1, 2]")
    with pytest.raises(relprune.IntegrityError, match="not a relprune manifest"):
        files.verify_manifest(tmp_path / "f")


def test_missing_data_says_where_it_looked_and_how_to_point_at_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RELPRUNE_DATA", raising=False)
    code, err = _run(["train", "--dataset", "fashion-mnist", "--data-dir", tmp_path / "nothing", "--epochs", "1",
                      "--out", tmp_path / "t"], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert "looked in" in err and str(tmp_path / "nothing") in err and "point --data-dir at them" in err
    assert not (tmp_path / "t").exists()


def test_train_help_lists_every_built_in_model(capsys):
    from relprune.experiments.models import MODELS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in MODELS), text


def test_a_second_demo_says_it_reuses_the_first_ones_results(tmp_path, capsys):
    args = ["demo", "--epochs", "1", "--finetune-epochs", "0", "--out", str(tmp_path / "d")]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "reusing" not in first.err
    assert main(args) == 0
    second = capsys.readouterr()
    assert "reusing the results of an earlier demo" in second.err and second.out.split("plot:")[0] == \
        first.out.split("plot:")[0]


def test_a_structured_export_shows_its_cost_and_can_fine_tune(trained, tmp_path, capsys):
    code, err = _run(["export", "--checkpoint", trained / "pruned", "--structured", "0.5", "--out", tmp_path / "a"],
                     capsys)
    assert code == 0, err
    assert re.search(r"structured 0\.5 \(rc\): sparsity \d+\.\d+% -> \d+\.\d+% .*test accuracy 0\.\d+ -> 0\.\d+", err)
    code, err = _run(["export", "--checkpoint", trained / "pruned", "--structured", "0.5", "--finetune-epochs", "1",
                      "--out", tmp_path / "b"], capsys)
    assert code == 0 and "-> fine-tuned 0." in err, err
    code, err = _run(["export", "--checkpoint", trained / "pruned", "--finetune-epochs", "1", "--out",
                      tmp_path / "c"], capsys)
    assert code == 1 and "--structured" in err and not (tmp_path / "c").exists()
