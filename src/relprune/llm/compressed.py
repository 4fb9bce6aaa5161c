"""Language-model folders whose pruned weights are stored compressed, and loading them.

Each pruned weight is stored in compressed-tensors' sparse layout (``sparse-bitmask`` or
``sparse-24-bitmask``: a bitmask plus the kept values, :mod:`relprune.core.compressed`), but the
folder is marked so that no other reader can mistake it for a plain model:

* ``config.json``'s ``model_type`` is :data:`COMPRESSED_MODEL_TYPE`, a sentence naming the reader,
  and the real type sits in its ``relprune_compression`` block (with the layout and the pruned
  layers). ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained`` refuse the folder with that
  sentence in their error, with or without compressed-tensors installed.
* The weights are ``relprune-compressed*.safetensors``, not ``model.safetensors``: a class-specific
  ``LlamaForCausalLM.from_pretrained(folder)`` (which only warns about the model type) finds no
  weights and refuses too, instead of initialising the compressed projections at random.

Why not compressed-tensors' own marking (a ``quantization_config`` with a ``sparsity_config``, which
this module wrote until issue 29): transformers 5 needs compressed-tensors >= 0.15, and 0.15 removed
the sparse compressors, so that stack loaded such a folder *without an error* as a different model
(every compressed projection newly initialised, announced only by its MISSING table). A dense folder
(the default, :func:`relprune.llm.save_pretrained`) is what every reader loads exactly; this layout
is for when the bytes matter, read by :func:`relprune.llm.load_model`. Folders in the earlier
layout are still read. :func:`load_compressed` builds the model with empty parameters and fills them
one tensor at a time, so a dense and a compressed copy of the whole model are never in memory
together.
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

#: The ``save_format`` values: every weight stored as it is (the default,
#: :data:`relprune.defaults.DEFAULT_LLM_SAVE_FORMAT`), or pruned weights compressed.
SAVE_FORMATS = ("dense", "compressed")
#: The compressed-tensors version whose sparse formats these folders follow.
FORMAT_VERSION = "0.14.0.1"
#: ``model_type`` of a compressed folder: transformers puts it in the error by which it refuses the folder.
COMPRESSED_MODEL_TYPE = ("relprune-compressed: read this folder with relprune.llm.load_model, or write it "
                         "with save_format='dense' (--save-format dense) for other readers")
#: The config block that holds the real model type, the layout and the compressed layers.
COMPRESSION_KEY = "relprune_compression"
#: The weights file of a compressed folder (``relprune-compressed-00001-of-00003.safetensors`` when sharded).
COMPRESSED_WEIGHTS = "relprune-compressed.safetensors"
COMPRESSED_INDEX = COMPRESSED_WEIGHTS + ".index.json"


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


def _as_dict(config: Any) -> Mapping[str, Any]:
    return config if isinstance(config, Mapping) else getattr(config, "to_dict", lambda: vars(config))()


def folder_layout(config: Any) -> str | None:
    """The sparse layout a config declares (``None``: a dense folder); refuses a layout we cannot read.

    Reads relprune's own marking (:data:`COMPRESSION_KEY`) and the compressed-tensors
    ``quantization_config`` that earlier relprune versions and LLM Compressor write.
    """
    block = _as_dict(config).get(COMPRESSION_KEY)
    if block is not None:
        layout = block.get("format") if isinstance(block, Mapping) else None
        if layout not in LAYOUTS:
            raise ModelLoadError(f"the folder is compressed as {layout!r}; relprune reads {' and '.join(LAYOUTS)}")
        return layout
    qc = _as_dict(config).get("quantization_config")
    if qc is None:
        return None
    qc = _as_dict(qc)
    sparsity = qc.get("sparsity_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or not sparsity:
        return None
    layout = sparsity.get("format")
    if layout not in LAYOUTS or any(qc.get("config_groups") or {}):
        raise ModelLoadError(f"the folder is compressed as {layout!r}"
                             f"{' with quantisation' if qc.get('config_groups') else ''}; relprune reads "
                             f"{' and '.join(LAYOUTS)} without quantisation")
    return layout


def unmarked_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json``'s content as transformers should read it: a compressed folder's real model type back."""
    raw = dict(raw)
    block = raw.get(COMPRESSION_KEY)
    if raw.get("model_type") == COMPRESSED_MODEL_TYPE:
        if not isinstance(block, Mapping) or not isinstance(block.get("model_type"), str):
            raise ModelLoadError(f"config.json is marked {COMPRESSED_MODEL_TYPE.split(':')[0]} but its "
                                 f"{COMPRESSION_KEY} block names no model type")
        raw["model_type"] = block["model_type"]
    return raw


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
        write_shard(folder, COMPRESSED_WEIGHTS, shards[0], {})
        return
    weight_map: dict[str, str] = {}
    total = sum(write_shard(folder, shard_name(i, len(shards), compressed=True), shard, weight_map)
                for i, shard in enumerate(shards, 1))
    write_index(folder, weight_map, total, compressed=True)


def write_shard(folder: Path, file: str, tensors: Mapping[str, Tensor], weight_map: dict[str, str]) -> int:
    """``tensors`` as ``folder/file``, their names mapped to it in ``weight_map``; returns their bytes."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(folder / file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, file))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def shard_name(index: int, count: int, *, compressed: bool) -> str:
    """The file name of shard ``index`` of ``count`` (transformers' pattern, or the compressed folder's)."""
    stem = COMPRESSED_WEIGHTS.removesuffix(".safetensors") if compressed else "model"
    return f"{stem}-{index:05d}-of-{count:05d}.safetensors"


def write_index(folder: Path, weight_map: Mapping[str, str], total_size: int, *, compressed: bool) -> None:
    """The shard index (transformers' ``model.safetensors.index.json``, or the compressed folder's)."""
    name = COMPRESSED_INDEX if compressed else "model.safetensors.index.json"
    (folder / name).write_text(json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def mark_compressed(folder: Path, layout: str, targets: Iterable[str], global_sparsity: float) -> None:
    """Mark ``folder/config.json`` as a compressed folder (see the module's docstring)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    config[COMPRESSION_KEY] = {
        "model_type": config["model_type"],
        "format": layout,
        "compressed_tensors_layout_version": FORMAT_VERSION,
        "global_sparsity": round(float(global_sparsity), 6),
        "sparsity_structure": "2:4" if layout == BITMASK_24 else "unstructured",
        "targets": sorted(targets),
    }
    config["model_type"] = COMPRESSED_MODEL_TYPE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def plain_config(config: Any) -> Any:
    """A copy of ``config`` without its compression blocks (the model it describes is the dense one)."""
    config = copy.deepcopy(config)
    for key in ("quantization_config", COMPRESSION_KEY):
        if hasattr(config, key):
            delattr(config, key)
    return config


class StoredCheckpoint:
    """The tensors of a folder's safetensors checkpoint (one file or an index of shards), read one at a time.

    ``read(key)`` gives a stored tensor as it is; ``get(name)`` and ``names()`` see the checkpoint as
    transformers names it, a compressed weight decompressed when read. Each read maps its file only
    while it reads, so pages of the checkpoint do not stay resident beside what is being built.
    """

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        try:
            for index, single in ((COMPRESSED_INDEX, COMPRESSED_WEIGHTS),
                                  ("model.safetensors.index.json", "model.safetensors")):
                if (folder / index).is_file():
                    weight_map = json.loads((folder / index).read_text())["weight_map"]
                    break
                if (folder / single).is_file():
                    with safe_open(str(folder / single), framework="pt") as fh:
                        weight_map = dict.fromkeys(fh.keys(), single)
                    break
            else:
                raise ModelLoadError(f"{folder} holds no safetensors checkpoint ({COMPRESSED_WEIGHTS}, "
                                     "model.safetensors or an index of shards)")
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

