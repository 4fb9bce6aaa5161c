"""Calibration batches in every form callers give them, normalised to one, and the model run on one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CalibrationError, RelpruneError


@dataclass
class Batch:
    """One calibration batch in the form every caller's batch is normalised to.

    The model is called as ``model(*args, **kwargs)``. ``token_mask`` (shape of the Linear
    inputs' leading dimensions, e.g. (batch, tokens)) marks the rows that count: padding
    tokens never enter a statistic. ``target`` feeds gradient statistics.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Tensor | None = None
    token_mask: Tensor | None = None

    @property
    def first(self) -> Any:
        """The first tensor argument (what error messages describe)."""
        return self.args[0] if self.args else next(iter(self.kwargs.values()), None)

    def to(self, device: torch.device) -> Batch:
        def move(v: Any) -> Any:
            return v.to(device) if isinstance(v, Tensor) else v
        return Batch(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()},
                     move(self.target), move(self.token_mask))


def split_batch(batch: Any) -> Batch:
    """Normalise a calibration batch.

    Accepted: a tensor; a tuple/list (input first, target second); a dict with ``input`` (and
    ``target``/``label``/``labels``); a dict of keyword arguments as Hugging Face models take them
    (``input_ids``, ``attention_mask``, ..., ``labels`` as the target; a 2-D ``attention_mask``
    also masks tokens out of every statistic); or a :class:`Batch`.
    """
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Tensor):
        return Batch((batch,))
    if isinstance(batch, (tuple, list)) and batch:
        return Batch((batch[0],), target=batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping) and "input" in batch:
        target = next((batch[k] for k in ("target", "label", "labels") if k in batch), None)
        return Batch((batch["input"],), target=target)
    if isinstance(batch, Mapping) and batch and all(isinstance(k, str) for k in batch):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        mask = kwargs.get("attention_mask")
        token_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        return Batch((), kwargs, target=batch.get("labels"), token_mask=token_mask)
    raise CalibrationError(
        f"a calibration batch must be a tensor, a tuple/list whose first element is the input, "
        f"or a dict (with key 'input', or of keyword arguments); got {type(batch).__name__}"
    )




def has_logits_target(b: Batch) -> bool:
    """A keyword batch with ``input_ids`` serves as its own causal-LM target."""
    return b.target is None and isinstance(b.kwargs.get("input_ids"), Tensor)



def run_model(model: nn.Module, b: Batch, batch: int | None) -> Any:
    """The model's forward pass; a batch it cannot take becomes a CalibrationError naming its shape."""
    x = b.first
    try:
        return model(*b.args, **b.kwargs)
    except RelpruneError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        where = f"calibration batch {batch}" if batch is not None else "a calibration batch"
        raise CalibrationError(
            f"{where} (shape {tuple(x.shape)}, {x.dtype}) does not fit the model: {_first_line(err)}"
        ) from err


def causal_lm_loss(logits: Tensor, labels: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy: position t predicts token t+1; masked or -100 labels are skipped."""
    labels = labels[:, 1:].clone()
    if token_mask is not None:
        labels[~token_mask[:, 1:].bool()] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
