"""Pruned weights stored compressed: the kept values plus a bitmask of where they sit.

The layouts are compressed-tensors' sparse formats (the checkpoint format of LLM Compressor and
vLLM), so their files describe a weight the same way:

* ``sparse-bitmask`` (any pattern): for a weight stored as ``prefix.weight`` of shape ``(O, ...)``,
  seen as ``O`` rows of ``I`` entries, ``prefix.shape`` (int64, the dense shape),
  ``prefix.compressed`` (the non-zero values, row by row, 1-D, the weight's dtype),
  ``prefix.bitmask`` (uint8 ``O x ceil(I / 8)``, numpy ``packbits`` with little bit order: bit ``j``
  of a row is entry ``j``) and ``prefix.row_offsets`` (int64, where each row starts in the values).
* ``sparse-24-bitmask`` (2:4 only): ``prefix.shape`` (int64, ``2 x 1``), ``prefix.compressed``
  (``O x I/2``: the two kept values of each group of four, in order) and ``prefix.bitmask`` as above,
  with exactly two bits set in each group of four.

A dense weight costs ``b`` bits an entry; a bitmask one costs ``1 + b x density``: at 50% in float32
that is 0.53 of the dense bytes, in bfloat16 0.56. Decoding checks every count before allocating, so
a file whose parts disagree is refused by name instead of filling a tensor with garbage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
LAYOUTS = (BITMASK, BITMASK_24)
#: The tensors each layout stores for one weight, under ``prefix.<part>``.
PARTS = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"), BITMASK_24: ("shape", "compressed", "bitmask")}


def layout_for(n_m: tuple[int, int] | None) -> str:
    """The layout for a pruning pattern: the 2:4 one for 2:4, the general bitmask otherwise."""
    return BITMASK_24 if n_m is not None and tuple(n_m) == (2, 4) else BITMASK


def _rows(weight: Tensor) -> Tensor:
    return weight.detach().reshape(weight.shape[0], -1).cpu()


def _pack(keep: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))


def _unpack(bits: Tensor, columns: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=columns, bitorder="little").astype(bool))


def _keep_24(rows: Tensor, name: str) -> Tensor:
    """Two entries of each group of four: the non-zero ones, topped up with zeros in order."""
    if rows.shape[1] % 4:
        raise CheckpointError(f"{name}: {rows.shape[1]} columns is not a multiple of 4, so it cannot be stored 2:4")
    groups = (rows != 0).reshape(rows.shape[0], -1, 4)
    if groups.numel() and int(groups.sum(-1).max()) > 2:
        raise CheckpointError(f"{name}: a group of four holds more than two non-zero weights; it is not 2:4 sparse")
    # Non-zeros first, then the earliest zeros: a stable choice, so a round trip gives the same file.
    rank = groups.to(torch.int8) * 8 + torch.arange(3, -1, -1, dtype=torch.int8)
    chosen = rank.topk(2, dim=-1).indices
    keep = torch.zeros_like(groups).scatter_(-1, chosen, True)
    return keep.reshape(rows.shape)


def compress(weight: Tensor, layout: str = BITMASK, name: str = "weight") -> dict[str, Tensor]:
    """The parts of ``layout`` for one weight (at least 2-D), keyed by part name."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown sparse layout {layout!r}; expected one of {list(LAYOUTS)}")
    if weight.dim() < 2:
        raise CheckpointError(f"{name}: a {weight.dim()}-D tensor is stored dense, not compressed")
    rows = _rows(weight)
    keep = rows != 0 if layout == BITMASK else _keep_24(rows, name)
    values = rows[keep]
    parts = {"compressed": values, "bitmask": _pack(keep)}
    if layout == BITMASK:
        counts = keep.sum(dim=1)
        parts["shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)
        parts["row_offsets"] = torch.cumsum(counts, 0) - counts
    else:
        parts["shape"] = torch.tensor(list(weight.shape), dtype=torch.int64).reshape(-1, 1)
        parts["compressed"] = values.reshape(rows.shape[0], rows.shape[1] // 2)
    return parts


def compressed_nbytes(weight: Tensor, layout: str = BITMASK) -> int:
    """Bytes the compressed parts of ``weight`` take (without computing them)."""
    rows = weight.shape[0]
    columns = weight.numel() // max(rows, 1)
    kept = weight.numel() // 2 if layout == BITMASK_24 else int(torch.count_nonzero(weight))
    extra = 8 * rows if layout == BITMASK else 0
    return kept * weight.element_size() + rows * -(-columns // 8) + 8 * weight.dim() + extra


def pays_off(weight: Tensor, layout: str = BITMASK) -> bool:
    """Whether storing ``weight`` compressed takes fewer bytes than storing it dense."""
    return weight.dim() >= 2 and weight.numel() > 0 and compressed_nbytes(weight, layout) < (
        weight.numel() * weight.element_size())


def decompress(parts: Mapping[str, Tensor], layout: str = BITMASK, name: str = "weight") -> Tensor:
    """The dense weight from its parts; ``CheckpointError`` naming ``name`` when they disagree."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown sparse layout {layout!r}; expected one of {list(LAYOUTS)}")
    missing = [p for p in PARTS[layout] if p not in parts]
    if missing:
        raise CheckpointError(f"{name}: the compressed weight lacks {missing}")
    shape_t, values, bits = parts["shape"], parts["compressed"], parts["bitmask"]
    if shape_t.dtype not in (torch.int32, torch.int64) or not 2 <= shape_t.numel() <= 8:
        raise CheckpointError(f"{name}: its stored shape is not a short integer tensor")
    shape = [int(s) for s in shape_t.flatten()]
    if min(shape) < 1:
        raise CheckpointError(f"{name}: its stored shape {shape} has an empty dimension")
    rows, columns = shape[0], math.prod(shape[1:])
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (rows, -(-columns // 8)):
        raise CheckpointError(f"{name}: its bitmask is {bits.dtype} {tuple(bits.shape)}, not uint8 "
                              f"{(rows, -(-columns // 8))} for the shape {shape}")
    # The bitmask is in memory already, so the dense tensor it describes is at most 8 x its size in entries.
    keep = _unpack(bits, columns)
    kept = int(keep.sum())
    if values.numel() != kept or not (values.is_floating_point() or values.is_complex()):
        raise CheckpointError(f"{name}: its bitmask marks {kept} values but {values.numel()} "
                              f"{values.dtype} values are stored")
    if layout == BITMASK_24:
        if columns % 4 or bool((keep.reshape(rows, -1, 4).sum(-1) != 2).any()):
            raise CheckpointError(f"{name}: its bitmask does not keep exactly two of each group of four (2:4)")
        if tuple(values.shape) != (rows, columns // 2):
            raise CheckpointError(f"{name}: 2:4 values are {tuple(values.shape)}, not {(rows, columns // 2)}")
    else:
        offsets = parts["row_offsets"]
        counts = keep.sum(dim=1)
        expected = torch.cumsum(counts, 0) - counts
        if offsets.numel() != rows or not torch.equal(offsets.flatten().to(torch.int64), expected):
            raise CheckpointError(f"{name}: its row offsets do not match its bitmask")
    dense = torch.zeros(rows, columns, dtype=values.dtype)
    dense[keep] = values.flatten()
    return dense.reshape(shape)


def prefix_of(key: str) -> str:
    """``a.b`` for the weight ``a.b.weight`` (the name compressed-tensors stores its parts under)."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


def compress_state(state: Mapping[str, Tensor], names: Iterable[str], layout: str = BITMASK) -> dict[str, Tensor]:
    """``state`` with each weight in ``names`` replaced by its parts (``prefix.<part>``); others unchanged."""
    chosen = set(names)
    unknown = sorted(chosen - set(state))
    if unknown:
        raise CheckpointError(f"cannot compress {unknown[:3]}: not in the state dict")
    clash = sorted(f"{prefix_of(k)}.{part}" for k in chosen for part in PARTS[layout]
                   if f"{prefix_of(k)}.{part}" in state)
    if clash:
        raise CheckpointError(f"cannot compress: the model already has tensors named like compressed parts "
                              f"({clash[:3]})")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in chosen:
            out[key] = value
            continue
        for part, tensor in compress(value, layout, key).items():
            out[f"{prefix_of(key)}.{part}"] = tensor
    return out


def compressed_prefixes(keys: Iterable[str]) -> list[str]:
    """The weights stored compressed among ``keys`` (by their ``prefix.bitmask`` part)."""
    return sorted(k[: -len(".bitmask")] for k in keys if k.endswith(".bitmask"))


def decompress_state(keys: Iterable[str], read: Callable[[str], Tensor], layout: str = BITMASK,
                     names: Iterable[str] = ()) -> Iterator[tuple[str, Tensor]]:
    """(name, dense tensor) for every stored tensor, one at a time; ``read(key)`` fetches a stored tensor.

    A compressed weight comes back as ``prefix.weight``, or under its own name when ``names`` (the keys that
    were compressed) holds one that is not a ``.weight`` (an attention's ``in_proj_weight``); only one weight
    is ever dense in memory here.
    """
    keys = list(keys)
    prefixes = compressed_prefixes(keys)
    named = {prefix_of(n): n for n in names}
    parts = {f"{p}.{part}" for p in prefixes for part in PARTS[layout]}
    for prefix in prefixes:
        found = {part: read(f"{prefix}.{part}") for part in PARTS[layout] if f"{prefix}.{part}" in keys}
        name = named.get(prefix, f"{prefix}.weight")
        yield name, decompress(found, layout, name)
    for key in keys:
        if key not in parts:
            yield key, read(key)
