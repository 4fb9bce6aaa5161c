"""Masks as a first-class type: applying them, holding them through training, making them permanent.

Masks are applied with ``torch.nn.utils.prune`` (``weight_orig`` parameter,
``weight_mask`` buffer, a forward pre-hook), so pruned weights stay zero
through optimiser steps and a ``state_dict`` carries the masks; any tool that
understands torch's pruning understands ours.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from ..errors import CheckpointError, StatsMismatchError
from .layers import prunable_layers


@dataclass(frozen=True)
class LayerReport:
    """One row of a sparsity report."""

    name: str
    shape: tuple[int, ...]
    kept: int
    total: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


class Masks(Mapping[str, Tensor]):
    """Layer name -> boolean keep-mask shaped like that layer's weight."""

    def __init__(self, masks: Mapping[str, Tensor], threshold: float | None = None):
        self._masks = {n: m.bool() for n, m in masks.items()}
        self.threshold = threshold

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    @property
    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self._masks.values()))

    @property
    def total(self) -> int:
        return int(sum(m.numel() for m in self._masks.values()))

    @property
    def sparsity(self) -> float:
        """Fraction of masked-out weights over all layers."""
        return 1.0 - self.kept / self.total if self.total else 0.0

    def report(self) -> list[LayerReport]:
        """Per-layer rows: name, shape, kept, total (and sparsity)."""
        return [LayerReport(n, tuple(m.shape), int(m.sum()), m.numel()) for n, m in self._masks.items()]

    def table(self) -> str:
        """The report as a fixed-width text table."""
        return format_report(self.report())

    def __repr__(self) -> str:
        return f"Masks({len(self)} layers, sparsity={self.sparsity:.4f})"


def format_report(rows: list[LayerReport]) -> str:
    """A fixed-width table of per-layer sparsity with a total line."""
    header = ("layer", "shape", "kept", "total", "sparsity")
    lines = [(r.name or "<model>", "x".join(map(str, r.shape)), str(r.kept), str(r.total),
              f"{r.sparsity:.2%}") for r in rows]
    kept, total = sum(r.kept for r in rows), sum(r.total for r in rows)
    lines.append(("total", "", str(kept), str(total), f"{1 - kept / total if total else 0:.2%}"))
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(5)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def is_masked(layer: nn.Module) -> bool:
    """True when the layer's weight is held by a mask (torch.nn.utils.prune)."""
    return torch_prune.is_pruned(layer) and hasattr(layer, "weight_mask")


def current_masks(model: nn.Module) -> Masks:
    """The masks currently applied, with all-ones masks for unmasked prunable layers."""
    out = {}
    for name, layer in prunable_layers(model).items():
        out[name] = layer.weight_mask.bool() if is_masked(layer) else torch.ones_like(layer.weight, dtype=torch.bool)
    return Masks(out)


def effective_weight(layer: nn.Module) -> Tensor:
    """The weight the next forward pass will use: ``weight_orig * weight_mask`` for a masked layer.

    torch's pruning refreshes ``layer.weight`` only in a forward pre-hook, so after loading or
    editing ``weight_orig`` the attribute can be stale; this never is.
    """
    if is_masked(layer):
        return (layer.weight_orig * layer.weight_mask).detach()
    return layer.weight.detach()


def refresh_masked_weights(model: nn.Module) -> None:
    """Recompute ``weight`` of every masked layer from ``weight_orig`` and ``weight_mask``."""
    for layer in model.modules():
        if is_masked(layer):
            layer.weight = layer.weight_orig * layer.weight_mask


def sparsity_report(model: nn.Module) -> list[LayerReport]:
    """Per-layer count of non-zero weights, masked or not."""
    rows = []
    for name, layer in prunable_layers(model).items():
        w = effective_weight(layer)
        rows.append(LayerReport(name, tuple(w.shape), int((w != 0).sum()), w.numel()))
    return rows


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Apply keep-masks, combining with any mask already there (a pruned weight stays pruned)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        layer = modules.get(name)
        if layer is None or tuple(layer.weight.shape) != tuple(mask.shape):
            raise StatsMismatchError(f"mask for {name!r} does not fit the model")
    for name, mask in masks.items():
        layer = modules[name]
        mask = mask.to(device=layer.weight.device, dtype=layer.weight.dtype)
        if is_masked(layer):
            layer.weight_mask.mul_(mask)
            with torch.no_grad():
                layer.weight = layer.weight_orig * layer.weight_mask
        else:
            torch_prune.custom_from_mask(layer, "weight", mask)


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on masked models.

    torch's pruning keeps ``weight`` as a computed, non-leaf tensor, which
    deepcopy refuses; it is set aside during the copy and recomputed after.
    """
    import copy

    masked = [m for m in model.modules() if is_masked(m) and "weight" in m.__dict__]
    saved = [m.__dict__.pop("weight") for m in masked]
    try:
        clone = copy.deepcopy(model)
    finally:
        for m, w in zip(masked, saved, strict=True):
            m.__dict__["weight"] = w
    for m in clone.modules():
        if is_masked(m) and "weight" not in m.__dict__:
            m.weight = m.weight_orig * m.weight_mask
    return clone


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight (zeros stay) and drop the masking machinery."""
    for layer in model.modules():
        if is_masked(layer):
            torch_prune.remove(layer, "weight")
    return model


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a state_dict that may hold masks (``*.weight_orig`` / ``*.weight_mask``).

    Layers with a mask in the checkpoint get one before loading; a checkpoint
    from another model raises :class:`CheckpointError` naming the keys and
    shapes that differ, and leaves the model unchanged.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    modules = dict(model.named_modules())
    masked = [k[: -len(".weight_mask")] for k in state_dict if k.endswith(".weight_mask")]
    unknown = [n for n in masked if n not in modules or not hasattr(modules[n], "weight")]
    if unknown:
        raise CheckpointError(f"checkpoint has masks for layers the model lacks: {unknown}")
    expected = {}
    for k, v in model.state_dict().items():
        expected[k] = tuple(v.shape)
    for n in masked:
        if not is_masked(modules[n]):
            shape = expected.pop(f"{n}.weight")
            expected[f"{n}.weight_orig"] = shape
            expected[f"{n}.weight_mask"] = shape
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = sorted(f"{k}: checkpoint {got[k]} vs model {expected[k]}"
                    for k in set(got) & set(expected) if got[k] != expected[k])
    if shapes or (strict and (missing or extra)):
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if extra:
            parts.append(f"unexpected keys {extra}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes))
        raise CheckpointError("checkpoint does not fit the model: " + ", ".join(parts))
    for n in masked:
        if not is_masked(modules[n]):
            torch_prune.identity(modules[n], "weight")
    model.load_state_dict(dict(state_dict), strict=strict)
    # load_state_dict fills weight_orig and weight_mask in place; weight would stay stale until a forward.
    refresh_masked_weights(model)
