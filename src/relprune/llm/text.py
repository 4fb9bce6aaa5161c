"""Text as token windows: random calibration windows, and consecutive non-overlapping evaluation windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.checks import whole_number
from ..errors import CalibrationError, DataError, RelpruneError


def tokenize_file(tokenizer: Any, path: str | Path) -> Tensor:
    """The whole file as one 1-D tensor of token ids (no special tokens added)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from err
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_seqlen(config: Any, seqlen: int) -> None:
    """Refuse windows longer than the model's positions (``config.max_position_embeddings``, when it has one)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise RelpruneError(f"seqlen {seqlen} (--seqlen) is beyond the model's {limit} positions")


def _check(ids: Tensor, seqlen: int, what: str) -> None:
    whole_number(seqlen, "seqlen", 2, CalibrationError)
    if len(ids) < seqlen:
        raise DataError(f"the {what} text has {len(ids)} tokens, fewer than one window of {seqlen}")


def calibration_windows(ids: Tensor, samples: int, seqlen: int, seed: int = 0) -> Tensor:
    """``samples`` windows of ``seqlen`` tokens at random offsets (seeded), as the Wanda and
    SparseGPT reference code draw calibration data: shape (samples, seqlen)."""
    _check(ids, seqlen, "calibration")
    whole_number(samples, "calibration samples", 1, CalibrationError)
    whole_number(seed, "seed", 0, CalibrationError)
    offsets = len(ids) - seqlen + 1
    if samples > offsets:
        raise DataError(f"{samples} calibration windows of {seqlen} tokens asked for; the calibration text "
                        f"({len(ids)} tokens) has only {offsets} distinct windows")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def evaluation_windows(ids: Tensor, seqlen: int, samples: int | None = None) -> Tensor:
    """Consecutive non-overlapping windows from the start (each token in at most one window):
    shape (windows, seqlen); ``samples`` caps the count, the tail shorter than a window is dropped."""
    _check(ids, seqlen, "evaluation")
    count = len(ids) // seqlen
    if samples is not None:
        whole_number(samples, "evaluation samples", 1, CalibrationError)
        if samples > count:
            raise DataError(f"the evaluation text holds {count} windows of {seqlen} tokens, fewer than {samples}")
        count = samples
    return ids[: count * seqlen].reshape(count, seqlen)


def batches_of(windows: Tensor, batch_size: int) -> list[dict[str, Tensor]]:
    """Keyword batches for a causal LM (``input_ids`` and an all-ones ``attention_mask``)."""
    whole_number(batch_size, "batch_size", 1, CalibrationError)
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]
