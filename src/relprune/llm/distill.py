"""Recovery after pruning: a short distillation of the pruned model from the dense one on calibration text.

The student (the pruned or shrunk model) is trained to match the teacher's next-token distribution:
the loss is KL(teacher || student) of the softmax at temperature ``T`` (times T^2), averaged over
tokens, on the calibration windows the pruning used. Masks of an unstructured model stay in place
(relprune's masks hold through training); a shrunk model trains as it is. The budget is counted in
optimiser steps and reported in CPU (wall) seconds.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RelpruneError


@dataclass(frozen=True)
class DistillReport:
    """What :func:`distill` did: steps, tokens seen, seconds, and the loss of the first and last steps."""

    steps: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float


def student_parameters(student: nn.Module, error: type[RelpruneError] = RelpruneError) -> list[nn.Parameter]:
    """The parameters distillation trains: all but the input embeddings (tied to the output head in most small
    models, and shared with the teacher's vocabulary); ``error`` when nothing else is left."""
    frozen = {id(p) for p in student.get_input_embeddings().parameters()} if hasattr(
        student, "get_input_embeddings") else set()
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in frozen]
    if not params:
        raise error("the student has no trainable parameters besides its embeddings")
    return params


def distillation_step(student: nn.Module, teacher: nn.Module, batch: dict[str, Tensor],
                      optimiser: torch.optim.Optimizer, temperature: float) -> tuple[float, int]:
    """One optimiser step of ``student`` towards ``teacher`` on ``batch``: KL(teacher || student) of the softmax at
    ``temperature`` (times its square), averaged over the tokens ``attention_mask`` keeps; (loss, tokens)."""
    with torch.no_grad():
        target = teacher(**batch, use_cache=False).logits.float() / temperature
    logits = student(**batch, use_cache=False).logits.float() / temperature
    per_token = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                         reduction="none").sum(-1)
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor):
        per_token = per_token[mask.bool()]
    loss = per_token.mean() * temperature**2
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.detach()), per_token.numel()


def distill(student: nn.Module, teacher: nn.Module, batches: Sequence[dict[str, Tensor]], *, steps: int,
            lr: float = 5e-5, temperature: float = 1.0, weight_decay: float = 0.0,
            progress: bool = False) -> DistillReport:
    """Train ``student`` for ``steps`` AdamW steps (cycling through ``batches``) towards ``teacher``'s logits.

    The student's embeddings stay frozen (tied to the output head in most small models, and shared
    with the teacher's vocabulary); every other parameter trains. The teacher is not changed.
    """
    if steps < 1:
        raise RelpruneError(f"steps must be at least 1, got {steps}")
    if not batches:
        raise RelpruneError("distillation needs calibration batches")
    if temperature <= 0:
        raise RelpruneError(f"temperature must be positive, got {temperature}")
    optimiser = torch.optim.AdamW(student_parameters(student), lr=lr, weight_decay=weight_decay)
    device = next(student.parameters()).device
    teacher.eval()
    was_training = student.training
    student.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    schedule = itertools.islice(itertools.cycle(batches), steps)
    if progress:
        from tqdm.auto import tqdm

        schedule = tqdm(schedule, total=steps, desc="distill", unit="step", disable=None, leave=False)
    try:
        for batch in schedule:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            loss, seen = distillation_step(student, teacher, batch, optimiser, temperature)
            losses.append(loss)
            tokens += seen
    finally:
        student.train(was_training)
        optimiser.zero_grad(set_to_none=True)
    return DistillReport(steps, tokens, time.perf_counter() - start, losses[0], losses[-1])
