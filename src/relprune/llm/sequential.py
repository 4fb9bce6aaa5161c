"""Pruning a stack of decoder blocks one block at a time, as the Wanda and SparseGPT reference code do.

The inputs of block 0 are captured once; then each block in turn gets its statistics from its
inputs, is pruned, and computes its outputs - with the pruned weights - as the next block's
inputs. Only one block's activations are held at a time. Attention masks, position embeddings
and other block arguments are passed through unchanged; padding tokens (``attention_mask`` 0)
never enter a statistic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core import allocation as _allocation
from ..core import distributed as _dist
from ..core.criteria import Criterion, get_criterion
from ..core.masks import Masks, make_permanent
from ..core.pruning import prune
from ..core.stats import Batch, collect_stats
from ..defaults import DEFAULT_LLM_CRITERION, DEFAULT_LLM_RECONSTRUCT, DEFAULT_LLM_SCOPE
from ..errors import CalibrationError, LayerError, SparsityError


def decoder_blocks(model: nn.Module, blocks: str | Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each block, in order.

    ``blocks`` is the dotted path of a ``ModuleList`` (``"model.layers"``) or a list of module names;
    by default the decoder layers of a Hugging Face causal LM (``model.model.layers`` and the like,
    found through ``base_model``), else the longest ``ModuleList`` in the model.
    """
    modules = dict(model.named_modules())
    if blocks is None:
        base = getattr(model, "base_model", model)
        prefix = next((n for n, m in modules.items() if m is base), "")
        for attr in ("layers", "h", "blocks", "decoder.layers"):
            name = f"{prefix}.{attr}" if prefix else attr
            if isinstance(modules.get(name), nn.ModuleList):
                blocks = name
                break
        else:
            lists = [(n, m) for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m)]
            if not lists:
                raise LayerError(f"{type(model).__name__} has no ModuleList of blocks; pass blocks=")
            blocks = max(lists, key=lambda nm: len(nm[1]))[0]
    if isinstance(blocks, str):
        found = modules.get(blocks)
        if not isinstance(found, nn.ModuleList) or not len(found):
            raise LayerError(f"blocks={blocks!r} does not name a non-empty ModuleList of the model")
        return [(f"{blocks}.{i}", b) for i, b in enumerate(found)]
    names = list(blocks)
    missing = [n for n in names if n not in modules]
    if missing or not names:
        raise LayerError(f"blocks names modules the model lacks: {missing}" if missing else "blocks= is empty")
    return [(n, modules[n]) for n in names]


class _Stop(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


def capture_inputs(model: nn.Module, block: nn.Module, batches: Iterable[dict[str, Tensor]]) -> list[Batch]:
    """The positional and keyword arguments block 0 receives for each batch (the model stops there)."""
    captured: list[Batch] = []
    current: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(Batch(tuple(args), dict(kwargs), token_mask=current.get("mask")))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, dict) or "input_ids" not in batch:
                    raise CalibrationError("language-model batches are dicts with 'input_ids' (and 'attention_mask')")
                mask = batch.get("attention_mask")
                current["mask"] = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
                try:
                    model(**batch, use_cache=False)
                except _Stop:
                    continue
                raise LayerError("the model's forward pass never reached the first block; check blocks=")
    finally:
        handle.remove()
    if not captured and not _dist.active(None):
        raise CalibrationError("the calibration batches are empty")
    return captured


def _next_inputs(block: nn.Module, batches: list[Batch]) -> list[Batch]:
    """The block's outputs on each batch, as the next block's inputs (other arguments unchanged)."""
    out = []
    with torch.no_grad():
        for b in batches:
            y = block(*b.args, **b.kwargs)
            y = y[0] if isinstance(y, (tuple, list)) else y
            if b.args:
                out.append(Batch((y, *b.args[1:]), b.kwargs, token_mask=b.token_mask))
            else:
                out.append(Batch((), {**b.kwargs, "hidden_states": y}, token_mask=b.token_mask))
    return out


def prune_sequential(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    *,
    sparsity: float | None = None,
    n_m: str | tuple[int, int] | None = None,
    criterion: str = DEFAULT_LLM_CRITERION,
    scope: str = DEFAULT_LLM_SCOPE,
    reconstruct: bool | str = DEFAULT_LLM_RECONSTRUCT,
    sequential: bool = True,
    blocks: str | Sequence[str] | None = None,
    liveness: bool = False,
    allocation: str = "uniform",
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    permanent: bool = True,
    progress: bool = False,
    **prune_options: Any,
) -> Masks:
    """Prune every Linear inside the decoder blocks; returns the masks under the model's own names.

    ``sequential=True``: each block sees the outputs of the blocks before it *after* they were
    pruned (the reference setting). ``sequential=False``: every block sees the dense model's
    activations (all blocks' statistics come from one dense pass first). ``permanent=True`` folds
    each block's masks into its weights as soon as it is pruned (torch's mask machinery keeps two
    more weight-sized tensors per layer); pass False to fine-tune through the masks afterwards.

    Under torch.distributed each rank passes its own share of the calibration batches (a rank may
    have none); every block's statistics are summed over the ranks, so all ranks prune alike.

    ``allocation="owl"`` gives each block its own sparsity by outlier-weighted layer-wise sparsity
    (OWL, Yin et al. 2024): blocks whose Wanda scores ``|W| ||x||`` hold more outliers (above
    ``owl_m`` times the block's mean score, on the dense model's activations) lose fewer weights,
    within ``sparsity +- owl_lambda``, the mean staying ``sparsity``; any criterion then prunes each
    block to its sparsity. It costs one more pass through the dense blocks.
    """
    if allocation not in ("uniform", "owl"):
        raise SparsityError(f"allocation must be 'uniform' or 'owl', got {allocation!r}")
    if allocation == "owl" and sparsity is None:
        raise SparsityError("allocation='owl' sets unstructured sparsities per block; give sparsity=, not n_m=")
    crit = get_criterion(criterion)
    wanted = statistics_for(crit, reconstruct, prune_options)
    named = decoder_blocks(model, blocks)
    was_training = model.training
    model.eval()
    out: dict[str, Tensor] = {}
    try:
        owl = allocation == "owl"
        inputs = capture_inputs(model, named[0][1], batches) if wanted or owl else []
        dense_inputs = None if sequential or not wanted else _dense_block_inputs(named, inputs)
        per_block = [sparsity] * len(named)
        if owl:
            assert sparsity is not None
            ratios = _block_outlier_ratios(named, inputs if dense_inputs is None else dense_inputs, owl_m)
            per_block = _allocation.owl_sparsities(ratios, sparsity, owl_lambda)
        iterator: Iterable[tuple[int, tuple[str, nn.Module]]] = enumerate(named)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(named), desc="blocks", unit="block", disable=None, leave=False)
        for i, (name, block) in iterator:
            feed = inputs if dense_inputs is None else dense_inputs[i]
            masks, outputs = prune_block(
                block, feed, wanted, criterion=crit, scope=scope, reconstruct=reconstruct,
                budget={"sparsity": per_block[i], "n_m": n_m}, liveness=liveness, permanent=permanent,
                last=dense_inputs is not None or i + 1 == len(named), **prune_options)
            out.update({f"{name}.{k}": v for k, v in masks.items()})
            if dense_inputs is None:
                inputs = outputs
    finally:
        model.train(was_training)
    return Masks(out)


def statistics_for(crit: Criterion, reconstruct: bool | str, prune_options: dict[str, Any]) -> set[str]:
    """The statistics a block's pruning needs: the criterion's, plus the Gram matrix for a re-fit."""
    wanted = set(crit.statistics)
    if reconstruct or crit.joint is not None:
        wanted.add("input_gram")
    if prune_options.get("bias_compensation"):
        wanted.add("contribution_mean")
    return wanted


def prune_block(block: nn.Module, inputs: list[Batch], wanted: set[str], *, criterion: str | Criterion,
                scope: str, reconstruct: bool | str, budget: dict[str, Any], liveness: bool, permanent: bool,
                last: bool, **prune_options: Any) -> tuple[Masks, list[Batch]]:
    """Gather one block's statistics on ``inputs``, prune it, and return (masks, its pruned outputs).

    The outputs are the next block's inputs; for the ``last`` block they are not computed.
    """
    stats = collect_stats(block, inputs, statistics=sorted(wanted), liveness=liveness) if wanted else None
    masks = prune(block, stats, criterion=criterion, scope=scope, reconstruct=reconstruct, **budget,
                  **prune_options)
    if permanent:
        make_permanent(block)
    outputs = inputs if last or not wanted else _next_inputs(block, inputs)
    return masks, outputs


def _dense_block_inputs(named: list[tuple[str, nn.Module]], inputs: list[Batch]) -> list[list[Batch]]:
    """Every block's inputs in the dense model (computed before anything is pruned)."""
    per_block = [inputs]
    for _, block in named[:-1]:
        per_block.append(_next_inputs(block, per_block[-1]))
    return per_block


def _block_outlier_ratios(named: list[tuple[str, nn.Module]], inputs: list[Batch] | list[list[Batch]],
                          m: float) -> list[float]:
    """OWL's outlier ratio of each block's Wanda scores, on the dense blocks' activations."""
    wanda = get_criterion("wanda")
    ratios = []
    feed = inputs
    for i, (_, block) in enumerate(named):
        own = feed[i] if feed and isinstance(feed[0], list) else feed
        stats = collect_stats(block, own, statistics=sorted(wanda.statistics), liveness=False)
        scores = [wanda.score(ls.weight, ls, {}).reshape(-1) for ls in stats.values()]
        ratios.append(_allocation.outlier_ratio(torch.cat(scores), m))
        if not (feed and isinstance(feed[0], list)) and i + 1 < len(named):
            feed = _next_inputs(block, feed)
    return ratios
