"""Statistics over the union of every rank's calibration batches, through torch.distributed.

Each rank gathers running sums over its own batches; this module re-expresses them around one
common input shift and all-reduces them (float64 sums, counts), so every rank ends with the
statistics a single process would gather over all ranks' batches (up to summation order) and
``prune`` then gives the same masks everywhere. A rank without batches takes part with zero sums.

Every rank must reach the same collectives, also when one of them fails: a rank's error is
shared first, and every rank raises.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, RelpruneError, StatsMismatchError
from .stats import LayerStats, empty_layer_stats


def _group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def active(distributed: bool | None) -> bool:
    """Whether to merge across ranks: ``None`` means "if a process group is initialised"."""
    if distributed is False:
        return False
    available = _group()
    if distributed and not available:
        raise RelpruneError("distributed=True needs an initialised torch.distributed process group "
                            "(torch.distributed.init_process_group, e.g. under torchrun)")
    return bool(available)


def _weights_fingerprint(chosen: dict[str, nn.Module]) -> list[float]:
    return [float(m.weight.detach().double().sum()) for m in chosen.values()]


def merge(
    chosen: dict[str, nn.Module],
    result: dict[str, LayerStats],
    wanted: frozenset[str] | None,
    error: BaseException | None,
) -> tuple[dict[str, LayerStats], frozenset[str]]:
    """All-reduce each layer's sums over the ranks (a rank that saw no batch adds zero sums);
    returns (statistics, statistic names)."""
    dist = torch.distributed
    mine: dict[str, Any] = {"error": None if error is None else f"{type(error).__name__}: {error}"}
    if error is None and result:
        mine.update(wanted=sorted(wanted or ()), weights=_weights_fingerprint(chosen),
                    layers={n: (ls.liveness, ls.shift.cpu()) for n, ls in result.items()})
    everyone: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failed = [(r, m["error"]) for r, m in enumerate(everyone) if m and m["error"]]
    if failed:
        if error is not None:
            raise error
        r, message = failed[0]
        raise CalibrationError(f"calibration failed on rank {r}: {message}")
    with_data = [(r, m) for r, m in enumerate(everyone) if m and "layers" in m]
    if not with_data:
        raise CalibrationError("the calibration batches are empty on every rank: no batch was yielded")
    ref_rank, ref = with_data[0]
    for r, m in with_data[1:]:
        if m["wanted"] != ref["wanted"]:
            raise CalibrationError(f"ranks {ref_rank} and {r} collected different statistics "
                                   f"({ref['wanted']} vs {m['wanted']}); give statistics= explicitly")
        if m["weights"] != ref["weights"]:
            raise StatsMismatchError(f"ranks {ref_rank} and {r} hold different weights; calibrate the same model")
        if {n: v[0] for n, v in m["layers"].items()} != {n: v[0] for n, v in ref["layers"].items()}:
            raise CalibrationError(f"ranks {ref_rank} and {r} found different liveness for some layer")
    statistics = frozenset(ref["wanted"])
    merged: dict[str, LayerStats] = {}
    for name, layer in chosen.items():
        liveness, shift = ref["layers"][name]
        device = layer.weight.device
        shift = shift.to(device)
        own = result.get(name) or empty_layer_stats(layer, liveness, shift, statistics)
        sums = own.rebased(shift)
        counts = torch.cat([own.live_count, torch.tensor([own.total_count, own.grad_batches],
                                                         dtype=torch.float64, device=device)])
        for key in sorted(sums):
            dist.all_reduce(sums[key])
        dist.all_reduce(counts)
        merged[name] = replace(own, shift=shift, live_count=counts[:-2].clone(), total_count=int(counts[-2].item()),
                               sums=sums, grad_batches=int(counts[-1].item()))
    return merged, statistics


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if _group():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and without a process group): the process that writes files and prints."""
    return world()[0] == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if world()[1] > 1:
        torch.distributed.barrier()


def init_from_env() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment).

    gloo on CPU, NCCL when CUDA is available. Returns whether a group of several ranks is active.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return True
