"""Language-model folders whose pruned weights are stored compressed, and loading them.

The folder is a transformers folder whose ``config.json`` carries a compressed-tensors
``quantization_config`` with a ``sparsity_config`` (format ``sparse-bitmask`` or
``sparse-24-bitmask``) and whose safetensors hold each pruned weight in that layout
(:mod:`relprune.core.compressed`), as LLM Compressor writes it.

Why we load it ourselves: transformers 5 needs compressed-tensors >= 0.15, and compressed-tensors
0.15 removed the sparse compressors (its ``ModelCompressor`` writes ``"sparsity_config": {}`` and
reads none), so in that stack ``from_pretrained`` leaves the compressed weights newly initialised
(its MISSING table) instead of decompressing them. Stacks with compressed-tensors <= 0.14
(transformers 4.x) decompress these folders themselves; ``benchmarks/compressed_interop.py`` checks
that. :func:`load_compressed` builds the model with empty parameters and fills them one tensor at
a time, so a dense and a compressed copy of the whole model are never in memory together.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.compressed import (
    BITMASK_24,
    LAYOUTS,
    PARTS,
    compress_state,
    compressed_prefixes,
    decompress,
    decompress_state,
    pays_off,
    prefix_of,
)
from ..errors import CheckpointError, ModelLoadError

#: The ``save_format`` values: pruned weights compressed (the default) or stored dense.
SAVE_FORMATS = ("compressed", "dense")
#: The compressed-tensors version whose sparse formats these folders follow.
FORMAT_VERSION = "0.14.0.1"


def sparsity_config(layout: str, targets: Iterable[str], global_sparsity: float) -> dict[str, Any]:
    """The ``quantization_config`` block that marks a folder as compressed-tensors sparse."""
    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "version": FORMAT_VERSION,
        "config_groups": {},
        "sparsity_config": {
            "format": layout,
            "global_sparsity": round(float(global_sparsity), 6),
            "registry_requires_subclass": False,
            "sparsity_structure": "2:4" if layout == BITMASK_24 else "unstructured",
            "targets": sorted(targets),
            "ignore": [],
        },
    }


def folder_layout(config: Any) -> str | None:
    """The sparse layout a config declares (``None``: a dense folder); refuses a layout we cannot read."""
    qc = getattr(config, "quantization_config", None) if not isinstance(config, Mapping) else config.get(
        "quantization_config")
    if qc is None:
        return None
    qc = qc if isinstance(qc, Mapping) else getattr(qc, "to_dict", lambda: vars(qc))()
    sparsity = qc.get("sparsity_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or not sparsity:
        return None
    layout = sparsity.get("format")
    if layout not in LAYOUTS or any(qc.get("config_groups") or {}):
        raise ModelLoadError(f"the folder is compressed as {layout!r}"
                             f"{' with quantisation' if qc.get('config_groups') else ''}; relprune reads "
                             f"{' and '.join(LAYOUTS)} without quantisation")
    return layout


def compressible(state: Mapping[str, Tensor], layout: str, skip: Iterable[str] = ()) -> list[str]:
    """Names of the weights in ``state`` that take fewer bytes compressed (2:4-valid ones for the 2:4 layout)."""
    skip = set(skip)
    names = []
    for key, value in state.items():
        if key in skip or not key.endswith(".weight") or not value.is_floating_point() or not pays_off(value, layout):
            continue
        if layout == BITMASK_24:
            rows = value.reshape(value.shape[0], -1)
            if rows.shape[1] % 4 or int((rows != 0).reshape(rows.shape[0], -1, 4).sum(-1).max()) > 2:
                continue
        names.append(key)
    return names


def write_compressed(state: Mapping[str, Tensor], folder: Path, layout: str, names: Iterable[str],
                     max_shard_bytes: int = 2 << 30) -> None:
    """Write ``state`` as safetensors with the weights ``names`` compressed (sharded as transformers does
    above ``max_shard_bytes``)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in compress_state(state, names, layout).items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def mark_compressed(folder: Path, layout: str, targets: Iterable[str], global_sparsity: float) -> None:
    """Add the sparsity block to ``folder/config.json``."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = sparsity_config(layout, targets, global_sparsity)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def plain_config(config: Any) -> Any:
    """A copy of ``config`` without its quantization block (the model it describes is the dense one)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


class StoredCheckpoint:
    """The tensors of a folder's safetensors checkpoint (one file or an index of shards), read one at a time.

    ``read(key)`` gives a stored tensor as it is; ``get(name)`` and ``names()`` see the checkpoint as
    transformers names it, a compressed weight decompressed when read. Each read maps its file only
    while it reads, so pages of the checkpoint do not stay resident beside what is being built.
    """

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        index = folder / "model.safetensors.index.json"
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
            elif (folder / "model.safetensors").is_file():
                with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
                    weight_map = dict.fromkeys(fh.keys(), "model.safetensors")
            else:
                raise ModelLoadError(f"{folder} holds no safetensors checkpoint (model.safetensors or its index)")
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise ModelLoadError(f"{folder}: cannot read its safetensors checkpoint: {err}") from err
        self.folder, self.weight_map = folder, weight_map
        config = folder / "config.json"
        self.layout = folder_layout(json.loads(config.read_text())) if config.is_file() else None
        self._compressed = set(compressed_prefixes(weight_map)) if self.layout else set()
        self._names = sorted(dense_names(weight_map, self.layout)) if self.layout else list(weight_map)

    def read(self, key: str) -> Tensor:
        """One stored tensor (a compressed weight's part, or any other tensor), copied out of its file."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.weight_map[key]), framework="pt") as fh:
            return fh.get_tensor(key)

    def get(self, name: str) -> Tensor:
        """The tensor transformers calls ``name``: a compressed weight comes back dense."""
        prefix = prefix_of(name)
        if name.endswith(".weight") and prefix in self._compressed:
            parts = {p: self.read(f"{prefix}.{p}") for p in PARTS[self.layout] if f"{prefix}.{p}" in self.weight_map}
            return decompress(parts, self.layout, name)
        return self.read(name)

    def names(self, prefix: str = "") -> list[str]:
        """The tensor names transformers sees (compressed weights under their own names)."""
        return [n for n in self._names if n.startswith(prefix)]

    def dense_numel(self, layout: str) -> int:
        """Values the checkpoint describes once decompressed (compressed weights counted by their shape)."""
        from safetensors import safe_open

        prefixes = compressed_prefixes(self.weight_map)
        parts = {f"{p}.{part}" for p in prefixes for part in PARTS[layout]}
        total = sum(math.prod(self.read(f"{p}.shape").flatten().tolist()) for p in prefixes
                    if f"{p}.shape" in self.weight_map)
        for key, file in self.weight_map.items():
            if key not in parts:
                with safe_open(str(self.folder / file), framework="pt") as fh:
                    total += math.prod(fh.get_slice(key).get_shape())
        return total


def load_compressed(folder: Path, config: Any, transformers: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The causal LM in ``folder`` (compressed), built with empty parameters and filled one tensor at a time."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    layout = folder_layout(config)
    stored = StoredCheckpoint(folder)
    plain = plain_config(config)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
        model = transformers.AutoModelForCausalLM.from_config(plain, dtype=dtype)
    wanted = dict(model.state_dict())
    seen = set()
    for name, tensor in decompress_state(stored.weight_map, stored.read, layout):
        if name not in wanted:
            raise CheckpointError(f"{folder}: the checkpoint holds {name!r}, which the config's model has not")
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            raise CheckpointError(f"{folder}: {name!r} is {tuple(tensor.shape)} in the checkpoint but "
                                  f"{tuple(wanted[name].shape)} in the config's model")
        set_module_tensor_to_device(model, name, "cpu", value=tensor.to(dtype))
        seen.add(name)
    if getattr(plain, "tie_word_embeddings", False):
        model.tie_weights()
    empty = sorted(n for n, p in model.named_parameters() if p.is_meta)
    if empty:
        raise CheckpointError(f"{folder}: the checkpoint lacks {empty[:3]}{' ...' if len(empty) > 3 else ''}")
    return model.eval()


def dense_names(keys: Iterable[str], layout: str) -> set[str]:
    """The tensor names a compressed checkpoint holding ``keys`` has once decompressed."""
    keys = set(keys)
    prefixes = compressed_prefixes(keys)
    parts = {f"{p}.{part}" for p in prefixes for part in PARTS[layout]}
    return (keys - parts) | {f"{p}.weight" for p in prefixes}


def stored_layout_numel(folder: Path, layout: str) -> int:
    """Values a compressed folder describes once decompressed (for checking it against its config)."""
    return StoredCheckpoint(folder).dense_numel(layout)

