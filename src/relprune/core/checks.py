"""Public arguments checked at the door: a number given as text, a boolean where a count is meant or a
fraction where a whole number is must be refused by name, not converted quietly or left to fail deep
inside torch."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ..errors import RelpruneError, SparsityError


def real_number(value: object, name: str, error: type[RelpruneError] = SparsityError) -> float:
    """``value`` as a float when it is a number (a Python, numpy or one-element torch one); refuses text and
    booleans, which ``float()`` would take ("0.5", True), with ``error`` naming ``name``."""
    scalar_tensor = (isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex()
                     and value.dtype != torch.bool)
    if isinstance(value, (str, bytes, bool)) or not (isinstance(value, numbers.Real) or scalar_tensor):
        raise error(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)  # type: ignore[arg-type]


def whole_number(value: object, name: str, minimum: int | None = None,
                 error: type[RelpruneError] = RelpruneError) -> int:
    """``value`` as an int when it is a whole number (not text, a boolean or a float), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be a whole number, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be at least {minimum}, got {value}")
    return int(value)
