"""Recovery after shrinking: distillation from the dense model under a token budget, resumable.

The student (a shrunk or pruned model) learns the dense teacher's next-token distribution (KL at
temperature T, as :func:`relprune.llm.distill.distill`) on text the user gives, cut into windows in a
seeded order, or, without text, on sequences sampled from the teacher itself (seeded per batch). The
budget counts training tokens. A checkpoint (student, optimiser, tokens done) is written every
``checkpoint_seconds`` and when the run is interrupted (Ctrl-C, SIGTERM), so the same call continues
where it stopped; a larger budget continues a finished run (the learning rate is constant, and the
windows of a smaller budget are the first ones of a larger).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.checks import real_number, whole_number
from ..core.interrupts import terminate_as_interrupt
from ..errors import RelpruneError
from .distill import distillation_step, student_parameters

CHECKPOINT_FILE = "recover-state.pt"


class RecoveryError(RelpruneError, ValueError):
    """A recovery budget, text or checkpoint that cannot be used."""


@dataclass(frozen=True)
class RecoverConfig:
    """How the student is trained: the token budget, window length and batch, optimiser and seed."""

    tokens: int
    seqlen: int = 256
    batch_size: int = 8
    lr: float = 5e-5
    temperature: float = 1.0
    seed: int = 0
    checkpoint_seconds: float = 300.0

    def validate(self) -> RecoverConfig:
        whole_number(self.tokens, "tokens", 1, RecoveryError)
        whole_number(self.seqlen, "seqlen", 2, RecoveryError)
        whole_number(self.batch_size, "batch_size", 1, RecoveryError)
        whole_number(self.seed, "seed", 0, RecoveryError)
        for name in ("lr", "temperature", "checkpoint_seconds"):
            if not real_number(getattr(self, name), name, RecoveryError) > 0:
                raise RecoveryError(f"{name} must be positive, got {getattr(self, name)!r}")
        return self

    @property
    def steps(self) -> int:
        """Optimiser steps the budget buys (the last one may be a partial batch's worth of tokens)."""
        return math.ceil(self.tokens / (self.seqlen * self.batch_size))


@dataclass(frozen=True)
class RecoverReport:
    """What :func:`recover` did: tokens trained in all (resumed runs included), steps, this call's seconds,
    the first and last step's loss of this call, and whether it resumed a checkpoint."""

    tokens: int
    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    resumed_from: int


class TextWindows:
    """Non-overlapping windows of a tokenised text in a seeded order: batch ``i`` is the same for any budget."""

    def __init__(self, ids: Tensor, cfg: RecoverConfig):
        count = len(ids) // cfg.seqlen
        if count == 0:
            raise RecoveryError(f"the recovery text ({len(ids)} tokens) is shorter than one window of {cfg.seqlen}")
        if cfg.tokens > count * cfg.seqlen:
            raise RecoveryError(f"a budget of {cfg.tokens:,} tokens is beyond the recovery text "
                                f"({count * cfg.seqlen:,} tokens in windows of {cfg.seqlen}); give more text or a "
                                "smaller budget")
        order = torch.randperm(count, generator=torch.Generator().manual_seed(cfg.seed))
        self.windows = ids[: count * cfg.seqlen].reshape(count, cfg.seqlen)[order]
        self.batch_size = cfg.batch_size
        self.fingerprint = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]

    def batch(self, i: int) -> Tensor:
        return self.windows[i * self.batch_size:(i + 1) * self.batch_size]


class SampledWindows:
    """Sequences sampled from the teacher (temperature 1 from a beginning-of-text token), seeded per batch."""

    def __init__(self, teacher: nn.Module, start_id: int, cfg: RecoverConfig):
        self.teacher, self.start_id, self.cfg = teacher, int(start_id), cfg
        self.fingerprint = f"sampled-from-teacher-{start_id}"

    def batch(self, i: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + i)
        state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        try:
            device = next(self.teacher.parameters()).device
            start = torch.full((self.cfg.batch_size, 1), self.start_id, dtype=torch.long, device=device)
            with torch.no_grad():
                out = self.teacher.generate(start, attention_mask=torch.ones_like(start), do_sample=True,
                                            top_k=0, top_p=1.0, temperature=1.0,
                                            max_new_tokens=self.cfg.seqlen - 1, min_new_tokens=self.cfg.seqlen - 1,
                                            pad_token_id=self.start_id)
        finally:
            torch.random.set_rng_state(state)
        return out[:, : self.cfg.seqlen].cpu()


def recover(student: nn.Module, teacher: nn.Module, windows: TextWindows | SampledWindows, cfg: RecoverConfig, *,
            checkpoint: str | Path | None = None, progress: bool = False) -> RecoverReport:
    """Distil ``teacher`` into ``student`` (in place) for ``cfg.tokens`` tokens of ``windows``.

    With ``checkpoint`` (a folder), state is saved there every ``cfg.checkpoint_seconds``, at the end and on
    interruption, and a call with the same student, text and settings resumes from it. The student's input
    embeddings stay frozen (tied to the output head in most small models)."""
    cfg = cfg.validate()
    optimiser = torch.optim.AdamW(student_parameters(student, RecoveryError), lr=cfg.lr, weight_decay=0.0)
    fingerprint = {"windows": windows.fingerprint, "seqlen": cfg.seqlen, "batch_size": cfg.batch_size,
                   "lr": cfg.lr, "temperature": cfg.temperature, "seed": cfg.seed,
                   "student": [list(p.shape) for p in student.parameters()]}
    path = None if checkpoint is None else Path(checkpoint) / CHECKPOINT_FILE
    step = _resume(path, student, optimiser, fingerprint)
    if step > cfg.steps:
        raise RecoveryError(f"the checkpoint in {checkpoint} is past this budget ({step} steps done, {cfg.steps} "
                            "asked for); give a budget of at least what it did, or delete it to start over")
    resumed = step * cfg.seqlen * cfg.batch_size
    device = next(student.parameters()).device
    teacher.eval()
    was_training = student.training
    student.train()
    losses: list[float] = []
    start = last_save = time.perf_counter()
    todo = range(step, cfg.steps)
    with terminate_as_interrupt():
        try:
            for i in _progress(todo, progress, cfg):
                ids = windows.batch(i).to(device)
                left = cfg.tokens - i * cfg.seqlen * cfg.batch_size
                if left < ids.numel():  # the budget's last tokens: whole windows, rounded up
                    ids = ids[: math.ceil(left / cfg.seqlen)]
                losses.append(distillation_step(student, teacher, {"input_ids": ids}, optimiser, cfg.temperature)[0])
                step = i + 1
                if path is not None and time.perf_counter() - last_save >= cfg.checkpoint_seconds:
                    _save(path, student, optimiser, fingerprint, step)
                    last_save = time.perf_counter()
        finally:
            student.train(was_training)
            optimiser.zero_grad(set_to_none=True)
            if path is not None:
                _save(path, student, optimiser, fingerprint, step)
    done = min(cfg.tokens, step * cfg.seqlen * cfg.batch_size)
    return RecoverReport(done, step, time.perf_counter() - start, losses[0] if losses else None,
                         losses[-1] if losses else None, resumed)


def _progress(todo: range, show: bool, cfg: RecoverConfig) -> Iterator[int]:
    if not show:
        return iter(todo)
    from ..core.progress import progress

    return iter(progress(todo, desc="recovery", total=len(todo), unit="step"))


def _resume(path: Path | None, student: nn.Module, optimiser: torch.optim.Optimizer, fingerprint: dict) -> int:
    if path is None or not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["fingerprint"])
    except Exception as err:  # a checkpoint torch cannot read is refused, never half-used
        raise RecoveryError(f"{path} is not a readable recovery checkpoint ({type(err).__name__}); delete it to "
                            "start over") from err
    if saved != json.loads(json.dumps(fingerprint)):
        differ = sorted(k for k in fingerprint if saved.get(k) != json.loads(json.dumps(fingerprint[k])))
        raise RecoveryError(f"{path} belongs to another recovery (its {', '.join(differ)} differ); delete it to "
                            "start over, or use its settings")
    student.load_state_dict(state["student"])
    optimiser.load_state_dict(state["optimiser"])
    return int(state["step"])


def _save(path: Path, student: nn.Module, optimiser: torch.optim.Optimizer, fingerprint: dict, step: int) -> None:
    from ..core.files import atomic_file

    state = {"student": student.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
             "fingerprint": json.dumps(fingerprint)}
    with atomic_file(path) as fh:
        torch.save(state, fh)


def config_record(cfg: RecoverConfig, report: RecoverReport) -> dict[str, Any]:
    """The settings and outcome as one JSON-able record (for relprune.json)."""
    return {**asdict(cfg), **asdict(report)}
