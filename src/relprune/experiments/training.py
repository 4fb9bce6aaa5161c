"""Training loops for the experiments: train, fine-tune with masks held, evaluate, resume.

Determinism: every epoch re-seeds its own shuffling and dropout from
(seed, epoch), so a run resumed from an epoch checkpoint continues exactly
as an uninterrupted one would. Masks applied by ``relprune.prune`` live in
every read of the weight (weight = original * mask), so training through them
keeps pruned weights at zero without any extra step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.files import atomic_file, atomic_write_text
from ..core.progress import progress
from ..errors import CheckpointError
from .data import Data, Split


@dataclass
class TrainConfig:
    """Optimisation settings for one training or fine-tuning run."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    schedule: str = "cosine"  # or "constant"
    augment: str = "none"  # "crop" (shift by up to 2 pixels) or "crop-flip" (and mirror left-right)
    #: Early stopping: end when validation accuracy has not improved for this many epochs and keep
    #: the best epoch's weights (0: train every epoch, keep the last).
    patience: int = 0


AUGMENTATIONS = ("none", "crop", "crop-flip")


def augment_batch(x: Tensor, kind: str, gen: torch.Generator, pad: int = 2) -> Tensor:
    """Random shifts of up to ``pad`` pixels (zero fill) and, for "crop-flip", random mirroring."""
    if kind == "none" or x.dim() != 4:
        return x
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {kind!r}")
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if kind == "crop-flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out = torch.where(flip.reshape(-1, 1, 1, 1), out.flip(-1), out)
    return out


Penalty = Callable[[], Tensor]


def progress_bar(iterable, *, desc: str, total: int | None = None, enabled: bool = True):
    """A bar on a terminal, a line every 30 s in a log (:func:`relprune.core.progress.progress`)."""
    return progress(iterable, desc=desc, total=total, unit="batches", enabled=enabled)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save in full or not at all (:func:`relprune.core.files.atomic_file`)."""
    with atomic_file(path) as fh:
        torch.save(obj, fh)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")


def evaluate(model: nn.Module, split: Split, batch_size: int = 1000) -> float:
    """Top-1 accuracy on a split, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in split.batches(batch_size):
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(len(split), 1)


def train(
    model: nn.Module,
    data: Data,
    cfg: TrainConfig,
    *,
    penalty: Penalty | None = None,
    alpha: Callable[[int, int], float] | None = None,
    checkpoint: str | Path | None = None,
    run: dict[str, Any] | None = None,
    desc: str = "train",
    log: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on ``data.train``; returns per-epoch history (loss, penalty, val accuracy).

    ``penalty`` is added to the loss as ``alpha(epoch, step) * penalty()``. With ``cfg.patience``
    training stops once validation accuracy has not improved for that many epochs, and the model
    ends with the weights (masks included) of its best validation epoch.
    With ``checkpoint``, the state after each epoch is saved atomically and an
    existing checkpoint with the same config and ``run`` description (model,
    regulariser, ...) is resumed; any other is refused. ``log`` gets one line
    per finished epoch.
    """
    from ..core.distributed import barrier, is_main, world

    rank, ranks = world()
    # Under torch.distributed every rank draws the same shuffled global batches and trains on its
    # slice of each (rank::ranks); DDP averages the gradients, so a step equals one over the batch.
    net = nn.parallel.DistributedDataParallel(model) if ranks > 1 else model
    if ranks > 1 and log is not None and not is_main():
        log = None
    opt = make_optimizer(model, cfg)
    steps_per_epoch = (len(data.train) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps)))
    elif cfg.schedule == "constant":
        sched = None
    else:
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt = Path(checkpoint) if checkpoint else None
    run = dict(run or {})
    best: dict[str, Any] = {"acc": -1.0, "epoch": -1, "state": None}
    if ckpt is not None and ckpt.is_file():
        state = _read_checkpoint(ckpt)
        # Settings added since the checkpoint was written count as their defaults.
        config = {**asdict(TrainConfig()), **state.get("config", {})}
        if config != asdict(cfg) or state.get("run", {}) != run:
            theirs = {**config, **state.get("run", {})}
            ours = {**asdict(cfg), **run}
            diff = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours))
                    if theirs.get(k) != ours.get(k)}
            raise CheckpointError(
                f"{ckpt} belongs to another run (checkpoint vs now: {diff}); use another --out, or "
                "delete the checkpoint to start over"
            )
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
            history, start_epoch = state["history"], state["epoch"] + 1
            best = state.get("best") or best
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{ckpt} does not fit this model: {str(err).splitlines()[0]}; delete it "
                                  "to start over") from err
        if log is not None:
            log(f"resuming from {ckpt} after epoch {start_epoch} of {cfg.epochs}")
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience and epoch - best["epoch"] > cfg.patience and best["epoch"] >= 0:
            break  # resumed after the stop
        model.train()
        torch.manual_seed(cfg.seed * 100_003 + epoch + 7_919 * rank)  # dropout and any other global RNG use
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        total = total_pen = 0.0
        seen = 0
        bar = progress_bar(data.train.batches(cfg.batch_size, shuffle=True, generator=gen),
                           total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{cfg.epochs}")
        for step, (x, y) in enumerate(bar):
            if ranks > 1:
                if len(y) < ranks:
                    continue  # a last batch too small to give every rank a sample
                x, y = x[rank::ranks], y[rank::ranks]
            x = augment_batch(x, cfg.augment, gen)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            if penalty is not None:
                pen = penalty()
                weight = alpha(epoch, step) if alpha is not None else 1.0
                loss = loss + weight * pen
                total_pen += float(pen.detach()) * len(y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
        record = {"epoch": epoch, "loss": total / seen, "val_acc": evaluate(model, data.val)}
        if penalty is not None:
            record["penalty"] = total_pen / seen
        history.append(record)
        if log is not None:
            log(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, "
                f"validation accuracy {record['val_acc']:.4f}")
        stop = False
        if cfg.patience:
            if record["val_acc"] > best["acc"]:
                best = {"acc": record["val_acc"], "epoch": epoch,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            stop = epoch - best["epoch"] >= cfg.patience
            if stop and log is not None:
                log(f"{desc}: no better validation accuracy for {cfg.patience} epochs; keeping epoch "
                    f"{best['epoch'] + 1}")
        if ckpt is not None and is_main():
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                         "scheduler": sched.state_dict() if sched is not None else None,
                         "history": history, "config": asdict(cfg), "run": run, "best": best}, ckpt)
        barrier()
        if stop:
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return history


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, read without unpickling arbitrary objects."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several kinds for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable training checkpoint ({type(err).__name__}); "
                              "delete it to start over") from err
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "history"} <= set(state):
        raise CheckpointError(f"{path} is not a relprune training checkpoint; delete it to start over")
    return state


def calibration_batches(split: Split, samples: int, batch_size: int = 256,
                        seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``samples`` examples drawn from a split with a fixed seed, as labelled batches."""
    if samples <= 0:
        raise ValueError("calibration samples must be positive")
    if samples > len(split):
        from ..errors import DataError

        raise DataError(f"{samples} calibration samples asked for; the training split holds {len(split)}")
    gen = torch.Generator().manual_seed(seed + 777)
    idx = torch.randperm(len(split), generator=gen)[:samples]
    sub = Split(split.x[idx], split.y[idx])
    return list(sub.batches(batch_size))


def save_json(obj: Any, path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)
