"""Bounds checked before a stored description of a model is built: a file must never make us
allocate more than it can fill."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError


def stored_numel(files: Iterable[str | Path]) -> int:
    """How many values the safetensors ``files`` declare, read from their headers only."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open has no iterator
                    total += math.prod(fh.get_slice(name).get_shape())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err
    return total


def meta_numel(build: Callable[[], nn.Module]) -> int:
    """The parameter count of the model ``build()`` makes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def check_fits(wanted: int, stored: int, where: str) -> None:
    """Refuse a description that asks for more parameters than its weights file holds."""
    if wanted > stored:
        raise CheckpointError(f"{where}: the stored description asks for {wanted:,} parameters but the weights "
                              f"hold {stored:,}; the description and the weights disagree")
