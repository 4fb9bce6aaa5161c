"""One call from a model and calibration text to a pruned model saved as a folder transformers loads."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.files import staged_folder
from ..core.masks import Masks
from ..core.recipe import Recipe
from ..defaults import DEFAULT_LLM_SAVE_FORMAT
from ..errors import RelpruneError
from .compressed import SAVE_FORMATS
from .load import load_model
from .save import refuse_occupied, write_pretrained
from .search import refuse_search
from .sequential import block_recipe, llm_recipe, prune_sequential
from .text import batches_of, calibration_windows, check_seqlen, tokenize_file


@dataclass(frozen=True)
class OneshotResult:
    """What :func:`oneshot` did: the masks (under the model's names), the recipe and where it saved."""

    masks: Masks
    recipe: Recipe
    out: Path | None
    #: Seconds the pruning itself took (calibration, statistics, masks, re-fits; not loading or saving).
    seconds: float = 0.0
    #: Config switches turned on in the saved folder for compensated biases (empty without bias compensation).
    switches: tuple[str, ...] = ()


def oneshot(model: Any, calibration: str | Path, recipe: Recipe | None = None, *, out: str | Path | None = None,
            tokenizer: Any = None, samples: int = 32, seqlen: int = 512, seed: int = 0, batch_size: int = 8,
            sequential: bool = True, progress: bool = False, save_format: str = DEFAULT_LLM_SAVE_FORMAT,
            device: Any = "auto", dtype: Any = None, verify: bool = True, **recipe_options: Any) -> OneshotResult:
    """Prune a causal language model on calibration text in one call, and save it when ``out`` is given.

    ``model`` is a loaded Hugging Face causal LM (pass its ``tokenizer``) or anything
    :func:`~relprune.llm.load_model` takes (a folder, a ``.gguf`` file, a hub id, ``"smollm2-135m"``).
    ``calibration`` is a UTF-8 text file, from which ``samples`` windows of ``seqlen`` tokens are
    drawn (seeded). The recipe is a :class:`~relprune.core.recipe.Recipe` or its keywords
    (``sparsity=0.5``, ``n_m="2:4"``, ``criterion=``, ``reconstruct=``, ``allocation="owl"``, ...),
    with the language-model defaults (:data:`relprune.defaults.DEFAULT_LLM_CRITERION`, ``admm``, whose masks
    are chosen with the weights and then re-fitted exactly). ``out`` must not hold anything yet; it is
    written in full or not at all, as a plain transformers folder (``save_format="compressed"``: pruned
    weights as bitmask plus values, read by relprune alone).
    A model given by name is loaded on ``device`` (``"auto"``: CUDA when present) in ``dtype``, a folder
    relprune wrote checked against its manifest first (``verify=False`` skips that). ``relprune llm prune``
    is this call; the folder's ``relprune.json`` records the recipe, the calibration and the result.

        relprune.llm.oneshot("smollm2-135m", "calib.txt", sparsity=0.5, out="runs/smol-50")
    """
    recipe = block_recipe(llm_recipe(recipe, recipe_options))  # every refusal before anything is loaded or written
    refuse_search(recipe)
    if save_format not in SAVE_FORMATS:
        raise RelpruneError(f"unknown save format {save_format!r}; expected one of {list(SAVE_FORMATS)}")
    target = None if out is None else Path(out)
    if target is not None:
        refuse_occupied(target)
    label = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model(model, quiet=True, device=device, dtype=dtype, verify=verify)
    elif tokenizer is None:
        raise RelpruneError("pass the model's tokenizer= along with a loaded model")
    check_seqlen(getattr(model, "config", None), seqlen)
    windows = calibration_windows(tokenize_file(tokenizer, calibration), samples, seqlen, seed)
    if progress:
        print(f"calibration: {len(windows)} windows of {seqlen} tokens from {calibration} (seed {seed})",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    masks = prune_sequential(model, batches_of(windows, batch_size), recipe, sequential=sequential,
                             progress=progress)
    seconds = time.perf_counter() - start
    switches: list[str] = []
    if target is not None:
        with staged_folder(target) as tmp:
            switches = write_pretrained(model, tokenizer, tmp, save_format=save_format, n_m=recipe.nm)
            record = {"model": label, "criterion": recipe.criterion, "scope": recipe.scope,
                      "sparsity": recipe.sparsity, "n_m": recipe.n_m, "reconstruct": recipe.reconstruct or "none",
                      "sequential": sequential, "bias_compensation": recipe.bias_compensation,
                      "refine": recipe.refine, "allocation": recipe.allocation,
                      "owl_lambda": recipe.owl_lambda if recipe.allocation != "uniform" else None,
                      **({"search_evaluations": recipe.search_evaluations,
                          "search_seconds": recipe.search_seconds} if recipe.allocation == "search" else {}),
                      "calibration": str(calibration), "calibration_samples": samples, "seqlen": seqlen,
                      "seed": seed, "seconds": round(seconds, 1), "achieved_sparsity": masks.sparsity,
                      "save_format": save_format, "bias_switches": switches}
            (tmp / "relprune.json").write_text(json.dumps(record, indent=2) + "\n")
    return OneshotResult(masks, recipe, target, seconds, tuple(switches))
