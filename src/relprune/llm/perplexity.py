"""Perplexity on held-out windows: every predicted token counted once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.progress import progress as _progress


@dataclass(frozen=True)
class Perplexity:
    """exp(mean next-token negative log-likelihood) over ``tokens`` predictions in ``windows`` windows."""

    value: float
    windows: int
    tokens: int
    nll: float

    def __str__(self) -> str:
        return f"perplexity {self.value:.3f} ({self.windows} windows, {self.tokens} predicted tokens)"


def perplexity(model: Any, windows: Tensor, *, batch_size: int = 1, progress: bool = False) -> Perplexity:
    """Each window is scored on its own: position t predicts token t+1, so a window of L tokens
    gives L-1 predictions (its first token is context only).

    ``batch_size`` windows go through the model at once; the logits of one batch (batch x L x
    vocabulary floats: 100 MB for SmolLM2 at L=512) dominate memory, hence the default of 1.
    """
    iterator = _progress(windows.split(batch_size), desc="perplexity", unit="batches", enabled=progress)
    total, count = 0.0, 0
    device = model.get_input_embeddings().weight.device if hasattr(model, "get_input_embeddings") else None
    with torch.no_grad():
        for ids in iterator:
            ids = ids.to(device) if device is not None else ids
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return Perplexity(math.exp(total / count), len(windows), count, total / count)
