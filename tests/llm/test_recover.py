"""Recovery by distillation under a token budget: it lowers the KL to the teacher, an interrupted run resumes to
exactly the state of an uninterrupted one, budgets and checkpoints that cannot be used are refused in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from tiny import WORDS, ids_batches, tiny_llama

from relprune.cli.main import main as cli
from relprune.llm.recover import (
    CHECKPOINT_FILE,
    RecoverConfig,
    RecoveryError,
    SampledWindows,
    TextWindows,
    recover,
)
from relprune.llm.structured import plan_units, shrink_units, unit_scores


def pair():
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    shrink_units(student, plan_units(student, unit_scores(student, ids_batches(), "rc"), 0.4))
    return student, teacher


def text_ids(n=2000):
    return torch.randint(2, len(WORDS) + 2, (n,), generator=torch.Generator().manual_seed(3))


def kl(student, teacher, ids):
    with torch.no_grad():
        s = torch.log_softmax(student(input_ids=ids).logits, -1)
        t = torch.log_softmax(teacher(input_ids=ids).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_recovery_lowers_the_kl_to_the_teacher_within_its_token_budget():
    student, teacher = pair()
    cfg = RecoverConfig(tokens=16 * 8 * 12, seqlen=16, batch_size=8, lr=3e-3)
    held = text_ids()[:64].reshape(4, 16)
    before = kl(student, teacher, held)
    report = recover(student, teacher, TextWindows(text_ids(), cfg), cfg)
    assert report.steps == 12 and report.tokens == cfg.tokens and report.resumed_from == 0
    assert kl(student, teacher, held) < 0.7 * before
    assert report.last_loss < report.first_loss


def test_an_interrupted_recovery_resumes_to_the_state_of_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = RecoverConfig(tokens=16 * 4 * 6, seqlen=16, batch_size=4, lr=1e-3, checkpoint_seconds=1e9)
    straight, teacher = pair()
    recover(straight, teacher, TextWindows(text_ids(), cfg), cfg)

    student, teacher = pair()
    windows = TextWindows(text_ids(), cfg)
    real = windows.batch
    calls = []

    def interrupted(i):
        calls.append(i)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C during the fourth step
        return real(i)

    monkeypatch.setattr(windows, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recover(student, teacher, windows, cfg, checkpoint=tmp_path)
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 3
    fresh, teacher = pair()  # a new process: the student as it was before recovery
    report = recover(fresh, teacher, TextWindows(text_ids(), cfg), cfg, checkpoint=tmp_path)
    assert report.resumed_from == 3 * 4 * 16 and report.steps == 6
    for (name, a), b in zip(fresh.state_dict().items(), straight.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # a larger budget continues the finished run
    more = RecoverConfig(**{**cfg.__dict__, "tokens": cfg.tokens + 64})
    assert recover(fresh, teacher, TextWindows(text_ids(), more), more, checkpoint=tmp_path).resumed_from == cfg.tokens
    less = RecoverConfig(**{**cfg.__dict__, "tokens": 64})
    with pytest.raises(RecoveryError, match="past this budget"):
        recover(fresh, teacher, TextWindows(text_ids(), less), less, checkpoint=tmp_path)


def test_budgets_texts_and_checkpoints_that_cannot_be_used_are_refused(tmp_path):
    student, teacher = pair()
    for bad in (0, -5, 1.5, "100"):
        with pytest.raises(RecoveryError, match="tokens"):
            RecoverConfig(tokens=bad).validate()
    with pytest.raises(RecoveryError, match="beyond the recovery text"):
        TextWindows(text_ids(100), RecoverConfig(tokens=1000, seqlen=16))
    cfg = RecoverConfig(tokens=64, seqlen=16, batch_size=4)
    recover(student, teacher, TextWindows(text_ids(), cfg), cfg, checkpoint=tmp_path)
    other = RecoverConfig(tokens=64, seqlen=16, batch_size=4, lr=1e-3)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(RecoveryError, match=r"another recovery .*lr"):
        recover(student, teacher, TextWindows(text_ids(), other), other, checkpoint=tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(RecoveryError, match="not a readable recovery checkpoint"):
        recover(student, teacher, TextWindows(text_ids(), cfg), cfg, checkpoint=tmp_path)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_windows_sampled_from_the_teacher_are_seeded_per_batch_and_budget_free():
    teacher = tiny_llama()
    a = SampledWindows(teacher, 2, RecoverConfig(tokens=100, seqlen=10, batch_size=3, seed=4))
    b = SampledWindows(teacher, 2, RecoverConfig(tokens=10_000, seqlen=10, batch_size=3, seed=4))
    assert a.batch(1).shape == (3, 10) and torch.equal(a.batch(1), b.batch(1))
    assert not torch.equal(a.batch(0), a.batch(1))
    assert (a.batch(0)[:, 0] == 2).all()


def test_llm_recover_writes_the_recovered_folder_and_removes_its_checkpoint(folder, tmp_path, capsys):
    calib = str(tmp_path / "calib.txt")
    assert cli(["llm", "shrink", "--model", str(folder), "--ratio", "0.3", "--calibration", calib,
                "--calibration-samples", "4", "--seqlen", "16", "--out", str(tmp_path / "small")]) == 0
    args = ["llm", "recover", "--model", str(tmp_path / "small"), "--teacher", str(folder), "--tokens", "256",
            "--text", calib, "--seqlen", "16", "--batch-size", "4", "--out", str(tmp_path / "rec")]
    assert cli(args) == 0
    assert "recovered on 256 tokens" in capsys.readouterr().out
    record = json.loads((tmp_path / "rec" / "relprune.json").read_text())
    assert record["recovery"]["tokens"] == 256 and record["ratio"] == 0.3  # the shrink's record is kept
    assert not (tmp_path / "rec.checkpoint").exists()
    assert cli([*args[:-1], str(tmp_path / "again"), "--tokens", "10000000"]) == 1
    assert "beyond the recovery text" in capsys.readouterr().err
    assert not (tmp_path / "again").exists() and not (tmp_path / "again.checkpoint").exists()
