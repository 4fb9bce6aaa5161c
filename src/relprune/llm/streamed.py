"""Pruning a model that need not fit in memory: one decoder block at a time, from disk to disk.

The model is built on the meta device (no memory); the parts outside the blocks (embeddings, final
norm, output head) and one stand-in block are real. Block by block, the block's tensors are read
from the safetensors checkpoint, its statistics gathered on the current inputs, it is pruned,
its outputs computed as the next block's inputs, and its tensors written to their own shard of
the output checkpoint before the next block is read. Peak memory is about the outside parts, one
block and one block's activations. The result is the same as :func:`prune_sequential` on the
loaded model, written as a sharded folder transformers loads.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.compressed import compress_state, layout_for, prefix_of
from ..core.files import MANIFEST, staged_folder, verify_manifest
from ..core.masks import Masks
from ..core.recipe import Recipe
from ..defaults import DEFAULT_LLM_SAVE_FORMAT
from ..errors import ModelLoadError, RelpruneError
from .blocks import BlockInputs, capture_block_inputs, refuse_non_finite, walk_blocks
from .compressed import (
    COMPRESSED_INDEX,
    COMPRESSION_KEY,
    SAVE_FORMATS,
    StoredCheckpoint,
    compressible,
    mark_compressed,
    shard_name,
    unmarked_config,
    write_index,
    write_shard,
)
from .load import check_checkpoint, load_config, require_transformers, resolve_model, tied_names
from .save import refuse_occupied, switches_for
from .search import refuse_search
from .sequential import block_recipe, block_sparsities, decoder_blocks, llm_recipe, prune_block

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", COMPRESSED_INDEX, MANIFEST)


def prune_streamed(
    source: str | Path,
    out: str | Path,
    batches: Sequence[dict[str, Tensor]],
    recipe: Recipe | None = None,
    *,
    blocks: str | Sequence[str] | None = None,
    sequential: bool = True,
    progress: bool = False,
    save_format: str = DEFAULT_LLM_SAVE_FORMAT,
    verify: bool = True,
    **recipe_keywords: Any,
) -> Masks:
    """Prune the model in folder ``source`` block by block into a new folder ``out``; returns the masks.

    As :func:`prune_sequential`: each block calibrates on the pruned blocks' outputs, or with
    ``sequential=False`` on the dense model's (every block read once more first, and every block's
    activations held); the same recipes, bias compensation included (the config's bias switches are
    decided before the first block, and the projections they govern get zero biases where they have
    none, as :func:`~relprune.llm.save_pretrained` does). ``out`` gets one safetensors shard per block
    (pruned weights compressed unless ``save_format="dense"``, as :func:`~relprune.llm.save_pretrained`
    writes them) plus one for the rest, an index, the config and the tokenizer files; it is written to a
    temporary folder first, so nothing half-written is left on failure. Every block gets the
    arguments the model passes it (its own mask and rotary tables where layers differ). A ``source``
    relprune wrote is checked against its manifest of SHA-256s first (``verify=False`` skips that).
    """
    recipe = streamed_recipe(llm_recipe(recipe, recipe_keywords))
    refuse_search(recipe, streamed=True)
    if save_format not in SAVE_FORMATS:
        raise RelpruneError(f"unknown save format {save_format!r}; expected one of {list(SAVE_FORMATS)}")
    layout = layout_for(recipe.nm)
    transformers = require_transformers()
    src = Path(resolve_model(source))
    if not src.is_dir():
        raise ModelLoadError(f"streamed pruning needs a local folder; {source} is not one")
    target = Path(out)
    refuse_occupied(target)
    if verify:
        verify_manifest(src)
    checkpoint = StoredCheckpoint(src)
    config = load_config(src)
    check_checkpoint(src, config, exact_names=True)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    named = decoder_blocks(skeleton, blocks)
    switches, biased = [], set()
    if recipe.bias_compensation:  # refused here, before any block is read, when the config cannot hold them
        pruned = {f"{name}.{n}" for name, block in named for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        switches, biased = switches_for(type(skeleton), config, pruned)
    host = _host_model(transformers, config, checkpoint, named)
    refuse_non_finite(host, f"{src} (outside its decoder blocks)")
    with staged_folder(target) as tmp:
        first = _load_block(named[0][1], named[0][0], checkpoint)
        if recipe.reads_activations:
            with _blocks_in(host, named):
                captured = capture_block_inputs(host, [b for _, b in named], batches, probe=first)
        else:  # magnitude without a re-fit reads no activations (as prune_sequential)
            captured = BlockInputs([[]] * len(named), [])
        weight_map: dict[str, str] = {}
        total_size = zeros = 0
        compressed_names: list[str] = []
        compressed = save_format == "compressed"
        masks: dict[str, Tensor] = {}
        shards = len(named) + 1
        loaders = [(name, functools.partial(_load_block, meta, name, checkpoint)) for name, meta in named]
        per_block = block_sparsities(recipe, loaders, captured)  # OWL reads every dense block once first
        loaders[0] = (named[0][0], lambda: first)  # block 0 is read already (the capture's probe)
        # A recipe that reads no statistic (magnitude under OWL) prunes without running the block.
        for step in walk_blocks(None, loaders, (), sequential=sequential, progress=progress, captured=captured,
                                run=bool(recipe.statistics())):
            first = None
            block_masks, outputs = prune_block(step.block, step.inputs, recipe, per_block[step.index], liveness=False,
                                               permanent=True, last=not sequential or step.index + 1 == len(named))
            step.outputs = outputs or None
            masks.update({f"{step.name}.{k}": v for k, v in block_masks.items()})
            _zero_biases(step.block, step.name, biased)
            tensors = {f"{step.name}.{k}": v.detach().contiguous() for k, v in step.block.state_dict().items()}
            if compressed:
                chosen = compressible(tensors, layout)
                compressed_names += chosen
                zeros += sum(int((tensors[n] == 0).sum()) for n in chosen)
                tensors = compress_state(tensors, chosen, layout)
            total_size += write_shard(tmp, shard_name(step.index + 1, shards, compressed=compressed), tensors,
                                      weight_map)
            del step, tensors  # the walk reads the next block only when no earlier one is alive
        rest = {n: checkpoint.get(n) for n in checkpoint.names() if not any(
            n.startswith(b + ".") for b, _ in named)}
        total_size += write_shard(tmp, shard_name(shards, shards, compressed=compressed), rest, weight_map)
        write_index(tmp, weight_map, total_size, compressed=compressed)
        for f in src.iterdir():
            if f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
        plain = unmarked_config(json.loads((tmp / "config.json").read_text()))
        for key in ("quantization_config", COMPRESSION_KEY):  # a compressed source's blocks describe its files
            plain.pop(key, None)
        plain.update(dict.fromkeys(switches, True))
        (tmp / "config.json").write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n")
        if compressed:  # marked even when no weight took fewer bytes: its files are named for relprune alone
            shapes = skeleton.state_dict()
            stored = sum(shapes[n].numel() for n in checkpoint.names() if n in shapes)
            mark_compressed(tmp, layout, [prefix_of(n) for n in compressed_names], zeros / max(stored, 1))
    return Masks(masks)


def streamed_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` for streamed pruning: a block recipe (the same ones :func:`prune_sequential` takes)."""
    return block_recipe(recipe)


def _zero_biases(block: nn.Module, name: str, biased: set[str]) -> None:
    """Zero biases on the block's Linears the saved config will build with one (they change no output)."""
    for n, m in block.named_modules():
        if isinstance(m, nn.Linear) and m.bias is None and f"{name}.{n}" in biased:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))


def _host_model(transformers: Any, config: Any, checkpoint: StoredCheckpoint, named: list[tuple[str, nn.Module]]):
    """The model with one decoder block of each kind: the real embeddings, norm, head and position encodings."""
    if not hasattr(config, "num_hidden_layers"):
        raise RelpruneError(f"{type(config).__name__} has no num_hidden_layers; streamed pruning needs a "
                            "Hugging Face decoder config")
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    if isinstance(getattr(small, "layer_types", None), list):
        # One block of each kind, so the host builds every kind's own rotary tables and masks.
        small.layer_types = list(dict.fromkeys(small.layer_types))
        small.num_hidden_layers = len(small.layer_types)
    host = transformers.AutoModelForCausalLM.from_config(small, dtype=torch.float32).eval()
    block_prefixes = tuple(f"{n}." for n, _ in named)
    state = {n: checkpoint.get(n) for n in checkpoint.names() if not n.startswith(block_prefixes)}
    result = host.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(block_prefixes[:small.num_hidden_layers])]
    tied = tied_names(host)
    missing = [k for k in missing if k not in tied]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"the checkpoint does not fit {type(host).__name__}: missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        host.tie_weights()
    # The host was built with one block of each kind; from here on it describes the whole model, so its decoder
    # prepares every block's own arguments (per-layer masks and rotary tables) when they are swapped in.
    configs = {id(c): c for m in host.modules() if hasattr(c := getattr(m, "config", None), "num_hidden_layers")}
    for cfg in configs.values():
        cfg.num_hidden_layers = config.num_hidden_layers
        if isinstance(getattr(config, "layer_types", None), list):
            cfg.layer_types = list(config.layer_types)
    return host


@contextlib.contextmanager
def _blocks_in(host: nn.Module, named: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """The skeleton's (meta) blocks in place of the host's own, for capturing their arguments."""
    parent = named[0][0].rpartition(".")[0]
    if [n for n, _ in named] != [f"{parent}.{i}" for i in range(len(named))]:
        raise RelpruneError("streamed pruning needs the decoder blocks to be one ModuleList, in order")
    owner_name, _, attr = parent.rpartition(".")
    owner = host.get_submodule(owner_name)
    own = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList([b for _, b in named]))
    try:
        yield
    finally:
        setattr(owner, attr, own)


def _load_block(meta_block: nn.Module, name: str, checkpoint: StoredCheckpoint) -> nn.Module:
    """Block ``name`` made real on the CPU with its tensors from the checkpoint."""
    block = copy.deepcopy(meta_block).to_empty(device="cpu")
    prefix = f"{name}."
    state = {k[len(prefix):]: checkpoint.get(k) for k in checkpoint.names(prefix)}
    try:
        block.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"block {name} does not fit the checkpoint: {str(err).splitlines()[0]}") from err
    refuse_non_finite(block, f"block {name}")
    persistent = set(block.state_dict())
    volatile = [n for n, _ in block.named_buffers() if n not in persistent]
    if volatile:
        raise RelpruneError(f"block {name} holds buffers the checkpoint does not store ({volatile[:3]}); "
                            "load the model and use prune_sequential instead")
    return block.eval()
