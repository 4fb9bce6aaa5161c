"""Masks as a first-class type: applying them, holding them through training, making them permanent.

Masks are parametrisations (``torch.nn.utils.parametrize``, as ``torch.ao.pruning`` applies
its own): the weight is ``original * mask`` on every read, by the layer's forward or by any module
that reads the attribute directly, so pruned weights stay zero through optimiser steps and a
``state_dict`` carries the masks (``*.parametrizations.weight.original`` and ``...0.mask``).
Checkpoints in ``torch.nn.utils.prune``'s layout (``weight_orig`` / ``weight_mask``, what relprune
wrote before) load into the same masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import CheckpointError, StatsMismatchError
from .layers import detach_packed_projections, named_layers, prunable_layers, weight_owner


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


class KeepMask(nn.Module):
    """The parametrisation that holds a layer's weight to its mask: ``weight = original * mask``.

    Registered with ``torch.nn.utils.parametrize`` (as ``torch.ao.pruning``'s ``FakeSparsity``), so
    the mask applies on every read of the attribute, by the layer's own forward or by any module
    that reads the weight directly (``nn.MultiheadAttention`` reads ``out_proj.weight``). The mask is
    a buffer of the weight's dtype; gradients reach only the kept entries of the original.
    """

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


#: Version counters moved by mask registration, per weight storage: (before, after). torch re-seats
#: the original with ``set_`` when a parametrisation is registered, which bumps the version counter
#: without changing a value; statistics gathered on the unmasked weight (which ``LayerStats``
#: checks by that counter) stay valid across it.
_REGISTRATION_BUMPS: dict[tuple[int, int], tuple[int, int]] = {}


def _register(layer: nn.Module, mask: Tensor) -> None:
    """Put ``layer``'s weight under ``mask`` (the parameter object stays the same)."""
    owner, attr = weight_owner(layer)
    before = getattr(owner, attr)._version
    parametrize.register_parametrization(owner, attr, KeepMask(mask), unsafe=True)
    original = owner.parametrizations[attr].original
    _REGISTRATION_BUMPS[(original.data_ptr(), original.numel())] = (before, original._version)


def unchanged_since(weight: Tensor, version: int) -> bool:
    """True when ``weight`` (or an alias of its storage) holds the values it held at ``version``:
    the same version, or the bump of a mask's registration right after it."""
    now = weight._version
    if now == version:
        return True
    return _REGISTRATION_BUMPS.get((weight.data_ptr(), weight.numel())) == (version, now)


def _keep_mask(layer: nn.Module) -> KeepMask | None:
    owner, attr = weight_owner(layer)
    if not parametrize.is_parametrized(owner, attr):
        return None
    return next((p for p in owner.parametrizations[attr] if isinstance(p, KeepMask)), None)


def is_masked(layer: nn.Module) -> bool:
    """True when the layer's weight is held by a relprune mask."""
    return _keep_mask(layer) is not None


def mask_of(layer: nn.Module) -> Tensor | None:
    """The mask buffer (the weight's dtype, in the parameter's layout) of a masked layer, else None."""
    keep = _keep_mask(layer)
    return None if keep is None else keep.mask


def original_weight(layer: nn.Module) -> Tensor:
    """The trained parameter under the mask (the weight itself for an unmasked layer)."""
    if not is_masked(layer):
        return layer.weight
    owner, attr = weight_owner(layer)
    return owner.parametrizations[attr].original


def current_masks(model: nn.Module) -> Masks:
    """The masks currently applied, with all-ones masks for unmasked prunable layers."""
    out = {}
    for name, layer in prunable_layers(model).items():
        out[name] = mask_of(layer).bool() if is_masked(layer) else torch.ones_like(layer.weight, dtype=torch.bool)
    return Masks(out)


def effective_weight(layer: nn.Module) -> Tensor:
    """The weight the next forward pass will use (``original * mask`` for a masked layer), detached."""
    return layer.weight.detach()


def refresh_masked_weights(model: nn.Module) -> None:
    """Kept for callers of the hook-based masks: a parametrised weight is computed on every read."""


def sparsity_report(model: nn.Module) -> list[LayerReport]:
    """Per-layer count of non-zero weights, masked or not."""
    rows = []
    for name, layer in prunable_layers(model).items():
        w = effective_weight(layer)
        rows.append(LayerReport(name, tuple(w.shape), int((w != 0).sum()), w.numel()))
    return rows


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Apply keep-masks, combining with any mask already there (a pruned weight stays pruned)."""
    modules = named_layers(model)
    for name, mask in masks.items():
        layer = modules.get(name)
        if layer is None or tuple(layer.weight.shape) != tuple(mask.shape):
            raise StatsMismatchError(f"mask for {name!r} does not fit the model")
    for name, mask in masks.items():
        layer = modules[name]
        mask = mask.to(device=layer.weight.device, dtype=layer.weight.dtype)
        if is_masked(layer):
            mask_of(layer).mul_(mask)
        else:
            _register(layer, mask)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, masks included (``torch.nn.utils.prune``'s too)."""
    import copy

    from torch.nn.utils import prune as torch_prune

    for layer in model.modules():
        for hook in layer._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name in layer.__dict__:
                # torch.nn.utils.prune keeps `orig * mask` as a non-leaf attribute, which deepcopy refuses;
                # the same values detached (its hook recomputes the attribute on every forward anyway).
                layer.__dict__[hook._tensor_name] = layer.__dict__[hook._tensor_name].detach()
    return copy.deepcopy(model)


def _own_class(layer: nn.Module) -> None:
    """Give a parametrised layer a class of its own before its parametrisation is removed.

    torch injects one ``Parametrized<Cls>`` class per registration, and a deep copy shares it with
    the original; removing the parametrisation deletes the weight property from that class, which
    would strip it from the other copy too.
    """
    cls = type(layer)
    layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def unmask(layer: nn.Module, *, keep_zeros: bool = True) -> None:
    """Remove a layer's mask: the weight becomes ``original * mask`` (``keep_zeros``) or the original."""
    owner, attr = weight_owner(layer)
    _own_class(owner)
    parametrize.remove_parametrizations(owner, attr, leave_parametrized=keep_zeros)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight (zeros stay) and drop the masking machinery: relprune's, and
    ``torch.nn.utils.prune``'s (``weight_orig`` / ``weight_mask`` and its forward pre-hook), and the
    packed attention projections relprune attached (the model is plain torch again)."""
    for layer in list(model.modules()):
        if is_masked(layer):
            unmask(layer)
        _fold_torch_prune(layer)
    detach_packed_projections(model)
    return model


def _fold_torch_prune(layer: nn.Module) -> None:
    """``torch.nn.utils.prune``'s masks of ``layer`` folded into plain parameters (``name = orig * mask``)."""
    from torch.nn.utils import prune as torch_prune

    hooked = {h._tensor_name for h in layer._forward_pre_hooks.values()
              if isinstance(h, torch_prune.BasePruningMethod)}
    for name in hooked:
        torch_prune.remove(layer, name)
    for key in [k.removesuffix("_orig") for k, _ in layer.named_parameters(recurse=False) if k.endswith("_orig")]:
        mask = getattr(layer, f"{key}_mask", None)
        if isinstance(mask, Tensor):  # the layout without its hook (e.g. built from a state_dict by hand)
            orig = getattr(layer, f"{key}_orig")
            del layer._parameters[f"{key}_orig"]
            del layer._buffers[f"{key}_mask"]
            if key in layer.__dict__:
                del layer.__dict__[key]
            layer.register_parameter(key, nn.Parameter((orig * mask).detach(), requires_grad=orig.requires_grad))


#: Key suffixes of a masked weight: torch.nn.utils.prune's (relprune's files and checkpoints before the
#: masks became parametrisations) and torch.nn.utils.parametrize's (a masked model's own state_dict).
LEGACY_ORIGINAL, LEGACY_MASK = ".weight_orig", ".weight_mask"
ORIGINAL, MASK = ".parametrizations.weight.original", ".parametrizations.weight.0.mask"
#: The parameters relprune masks: a layer's ``weight``, and an attention's packed ``in_proj_weight``.
MASKED_ATTRIBUTES = ("weight", "in_proj_weight")


def mask_key_parts(key: str) -> tuple[str, str] | None:
    """(owner module's name, attribute) for the key of a mask (``owner.parametrizations.attr.0.mask``)."""
    for attr in MASKED_ATTRIBUTES:
        suffix = f".parametrizations.{attr}.0.mask"
        if key.endswith(suffix):
            return key[: -len(suffix)], attr
        if key == suffix[1:]:
            return "", attr
    return None


def _as_parametrized_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with torch.nn.utils.prune's mask keys renamed to the parametrisation's."""
    out = {}
    for key, value in state_dict.items():
        for attr in MASKED_ATTRIBUTES:
            if key.endswith(f".{attr}_orig"):
                key = f"{key[: -len(attr) - 6]}.parametrizations.{attr}.original"
            elif key.endswith(f".{attr}_mask"):
                key = f"{key[: -len(attr) - 6]}.parametrizations.{attr}.0.mask"
        out[key] = value
    return out


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a state_dict that may hold masks (``*.parametrizations.weight.original`` / ``...0.mask``, or
    the ``*.weight_orig`` / ``*.weight_mask`` of checkpoints written before masks were parametrisations;
    an attention's packed projection the same with ``in_proj_weight`` for ``weight``).

    Layers with a mask in the checkpoint get one before loading; a checkpoint from another model
    raises :class:`CheckpointError` naming the keys and shapes that differ, and leaves the model
    unchanged.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    state_dict = _as_parametrized_keys(state_dict)
    prunable_layers_of = {weight_owner(m): m for m in _layers_with_weights(model)}
    modules = dict(model.named_modules())
    masked: dict[str, nn.Module] = {}  # prefix of the mask's keys -> the layer it masks
    unknown = []
    for key in state_dict:
        split = mask_key_parts(key)
        if split is None:
            continue
        owner_name, attr = split
        owner = modules.get(owner_name)
        layer = None if owner is None else prunable_layers_of.get((owner, attr))
        if layer is None and owner is not None and attr == "weight" and isinstance(getattr(owner, "weight", None),
                                                                                   Tensor):
            layer = owner
        if layer is None:
            unknown.append(owner_name)
        else:
            masked[f"{owner_name}.parametrizations.{attr}" if owner_name else f"parametrizations.{attr}"] = layer
    if unknown:
        raise CheckpointError(f"checkpoint has masks for layers the model lacks: {unknown}")
    expected = {}
    for k, v in model.state_dict().items():
        expected[k] = tuple(v.shape)
    for prefix, layer in masked.items():
        if not is_masked(layer):
            plain = prefix.replace("parametrizations.", "")
            shape = expected.pop(plain)
            expected[f"{prefix}.original"] = shape
            expected[f"{prefix}.0.mask"] = shape
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
    for layer in masked.values():
        if not is_masked(layer):
            _register(layer, torch.ones_like(layer.weight))
    model.load_state_dict(dict(state_dict), strict=strict)


def _layers_with_weights(model: nn.Module) -> list[nn.Module]:
    """Every prunable layer of ``model`` (packed attention projections attached), without refusing any."""
    from .layers import attach_packed_projections, is_prunable

    attach_packed_projections(model)
    return [m for m in model.modules() if is_prunable(m)]
