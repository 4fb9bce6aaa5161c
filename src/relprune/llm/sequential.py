"""Pruning a stack of decoder blocks one block at a time, as the Wanda and SparseGPT reference code do.

The arguments the model passes each block (its own attention mask, rotary tables and the like,
see :mod:`.blocks`) are captured once; then each block in turn gets its statistics from its
inputs, is pruned, and computes its outputs - with the pruned weights - as the next block's
hidden states. Only one block's activations are held at a time; padding tokens
(``attention_mask`` 0) never enter a statistic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..core import allocation as _allocation
from ..core.batches import Batch
from ..core.collect import collect_stats
from ..core.criteria import get_criterion
from ..core.masks import Masks, make_permanent
from ..core.pruning import prune
from ..core.recipe import Recipe
from ..defaults import DEFAULT_LLM_CRITERION, DEFAULT_LLM_RECONSTRUCT, DEFAULT_LLM_SCOPE
from ..errors import CalibrationError, LayerError, SparsityError
from .blocks import (
    BlockInputs,
    BlockSource,
    block_outputs,
    capture_block_inputs,
    refuse_non_finite,
    walk_blocks,
)
from .search import refuse_search, search_sparsities, sparsities_by_errors


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


def prune_sequential(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    recipe: Recipe | None = None,
    *,
    sequential: bool = True,
    blocks: str | Sequence[str] | None = None,
    liveness: bool = False,
    permanent: bool = True,
    progress: bool = False,
    **recipe_keywords: Any,
) -> Masks:
    """Prune every Linear inside the decoder blocks; returns the masks under the model's own names.

    The recipe is a :class:`~relprune.core.recipe.Recipe` or its keywords (``sparsity=0.5``, ``n_m="2:4"``,
    ``criterion=``, ``reconstruct=``, ``allocation="owl"``, ...; :meth:`Recipe.given`), with the
    language-model defaults (:data:`relprune.defaults.DEFAULT_LLM_CRITERION`, re-fit
    :data:`relprune.defaults.DEFAULT_LLM_RECONSTRUCT`) and comparison within each output row.
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
    block to its sparsity. It costs one more pass through the dense blocks. ``allocation="entropy"``
    does the same with each block's effective share of weights (exp of the entropy of its outputs'
    mean relative contributions, :func:`relprune.core.allocation.effective_share`) in place of the
    outlier ratio: blocks whose outputs rest on fewer weights lose more.
    """
    recipe = block_recipe(llm_recipe(recipe, recipe_keywords))
    refuse_search(recipe)
    wanted = set(recipe.statistics())
    named = decoder_blocks(model, blocks)
    refuse_non_finite(model)
    modules = [b for _, b in named]
    was_training = model.training
    model.eval()
    out: dict[str, Tensor] = {}
    try:
        captured = None
        if recipe.allocation != "uniform":
            captured = capture_block_inputs(model, modules, batches)
        if recipe.allocation == "search":
            per_block: list[BlockLevel] = list(search_sparsities(model, recipe, named, captured, batches)[0])
        else:
            per_block = block_sparsities(recipe, named, captured or BlockInputs([[]] * len(named), []))
        # A recipe that reads no activation (magnitude) runs no block.
        for step in walk_blocks(model, named, batches, sequential=sequential, progress=progress, captured=captured,
                                run=bool(wanted)):
            masks, outputs = prune_block(step.block, step.inputs, recipe, per_block[step.index], liveness=liveness,
                                         permanent=permanent, last=not sequential or step.index + 1 == len(named))
            out.update({f"{step.name}.{k}": v for k, v in masks.items()})
            step.outputs = outputs or None
    finally:
        model.train(was_training)
    return Masks(out)


def llm_recipe(recipe: Recipe | None, keywords: dict[str, Any]) -> Recipe:
    """The recipe a language-model entry point was given (``recipe`` or its keywords), the keywords
    defaulting to the language-model recipe."""
    return Recipe.given(recipe, keywords, criterion=DEFAULT_LLM_CRITERION, reconstruct=DEFAULT_LLM_RECONSTRUCT)


def block_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` for block-by-block pruning: compared within rows by default; criteria that need the
    whole model (a loss gradient, output importance) refused."""
    crit = recipe.validate().crit
    if "weight_grad" in crit.statistics:
        raise CalibrationError(f"criterion {crit.name!r} scores by the gradient of the model's loss, which "
                               "block-by-block pruning does not compute; choose a criterion without gradients")
    if crit.options - {"ucb_k"}:
        raise CalibrationError(f"criterion {crit.name!r} needs {sorted(crit.options)} from the whole model "
                               "(see relprune.output_importance), which block-by-block pruning does not have")
    if recipe.threshold is not None:
        raise SparsityError("block-by-block pruning takes a sparsity or an N:M pattern, not a threshold")
    return recipe.with_scope(DEFAULT_LLM_SCOPE)


def prune_block(block: nn.Module, inputs: list[Batch], recipe: Recipe, level: BlockLevel, *, liveness: bool,
                permanent: bool, last: bool) -> tuple[Masks, list[Tensor]]:
    """Gather one block's statistics on ``inputs``, prune it by ``recipe`` at ``level`` (the block's sparsity,
    or each of its layers' by name, from :func:`block_sparsities`), and return (masks, its pruned outputs).

    The outputs (hidden states) are the next block's inputs; for the ``last`` block, or when no
    statistic is wanted, they are not computed (an empty list).
    """
    wanted = recipe.statistics()
    stats = collect_stats(block, inputs, statistics=sorted(wanted), liveness=liveness) if wanted else None
    if isinstance(level, Mapping):  # every layer its own sparsity: each pruned on the statistics gathered above
        masks = Masks({k: v for name, s in level.items()
                       for k, v in prune(block, stats, replace(recipe, sparsity=s, allocation="uniform"),
                                         layers=[name]).items()})
    else:
        masks = prune(block, stats, replace(recipe, sparsity=level, allocation="uniform"))
    if permanent:
        make_permanent(block)
    outputs = [] if last or not wanted else block_outputs(block, inputs)
    return masks, outputs


#: A block's sparsity, or each of its layers' (by name within the block).
BlockLevel = float | None | Mapping[str, float]


def block_sparsities(recipe: Recipe, named: Sequence[tuple[str, BlockSource]],
                     captured: BlockInputs) -> list[BlockLevel]:
    """Each block's sparsity under ``recipe``: its own, OWL's from the dense blocks' Wanda scores, the
    contribution entropy's from their mean relative contributions, or (``"errors"``) each layer's from the
    layers' output-error curves on their dense input Grams.

    ``named`` holds the blocks or, for a model read from disk, functions that load each one (called
    once, in order, for the allocation's pass over the dense blocks); ``captured`` is their calls.
    """
    if recipe.allocation == "uniform":
        return [recipe.sparsity] * len(named)
    assert recipe.sparsity is not None
    if recipe.allocation == "errors":
        return list(sparsities_by_errors(recipe, named, captured))
    if recipe.allocation == "search":
        raise SparsityError("the search allocation scores the whole model's output: it is chosen by "
                            "prune_sequential, not block by block")
    wanda = get_criterion("wanda")
    statistics = ["relative_mean"] if recipe.allocation == "entropy" else sorted(wanda.statistics)
    ratios = []
    for step in walk_blocks(None, named, (), captured=captured):
        stats = collect_stats(step.block, step.inputs, statistics=statistics, liveness=False)
        if recipe.allocation == "entropy":
            sizes = [ls.weight.numel() for ls in stats.values()]
            shares = [_allocation.effective_share(ls.relative_mean) for ls in stats.values()]
            ratios.append(sum(s * n for s, n in zip(shares, sizes, strict=True)) / sum(sizes))
        else:
            scores = [wanda.score(ls.weight, ls, {}).reshape(-1) for ls in stats.values()]
            ratios.append(_allocation.outlier_ratio(torch.cat(scores), recipe.owl_m))
    return _allocation.owl_sparsities(ratios, recipe.sparsity, recipe.owl_lambda)


