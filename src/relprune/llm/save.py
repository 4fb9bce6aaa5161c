"""Writing a pruned language model as a folder plain transformers loads.

Bias compensation gives bias-free projections a bias; transformers builds a bias only where the
config asks for one (Llama-style ``attention_bias`` and ``mlp_bias`` switch them on per group of
projections). So before saving, the switches that cover the new biases are turned on and the
other projections they govern get zero biases, which change no output.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.compressed import layout_for, prefix_of
from ..core.files import staged_folder
from ..core.masks import make_permanent
from ..defaults import DEFAULT_LLM_SAVE_FORMAT
from ..errors import RelpruneError
from .compressed import SAVE_FORMATS, compressible, mark_compressed, write_compressed
from .load import require_transformers

#: Config switches that make transformers build biases on groups of Linear layers.
BIAS_SWITCHES = ("attention_bias", "mlp_bias")


def _biased_linears(model_type: type, config: Any) -> set[str]:
    """Names of the Linear layers with a bias in a model built from ``config`` (on the meta device)."""
    with torch.device("meta"):
        reference = model_type(config)
    return {n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}


def bias_switches(model: nn.Module) -> tuple[list[str], set[str]]:
    """(config switches to turn on, layers that then need a zero bias) so the model's biases load.

    Raises ``RelpruneError`` naming the layers whose bias no switch of the config can express.
    """
    have = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}
    switches, built = switches_for(type(model), model.config, have)
    return switches, built - have


def switches_for(model_type: type, config: Any, wanted: set[str]) -> tuple[list[str], set[str]]:
    """(config switches to turn on, every Linear then built with a bias) so that each of ``wanted`` has one.

    Raises ``RelpruneError`` naming the layers whose bias no switch of the config can express.
    """
    config = copy.deepcopy(config)
    built = _biased_linears(model_type, config)
    switches = []
    for flag in BIAS_SWITCHES:
        if not (wanted - built):
            break
        if getattr(config, flag, None) is False:
            trial = copy.deepcopy(config)
            setattr(trial, flag, True)
            gained = _biased_linears(model_type, trial) - built
            if gained & (wanted - built):
                config, built, switches = trial, built | gained, [*switches, flag]
    unexpressed = sorted(wanted - built)
    if unexpressed:
        raise RelpruneError(
            f"{model_type.__name__}'s config has no switch for biases on {unexpressed[:3]}"
            f"{' ...' if len(unexpressed) > 3 else ''}, so a transformers folder cannot hold the compensated "
            "biases; prune without bias compensation")
    return switches, built


def save_pretrained(model: nn.Module, tokenizer: Any, folder: str | Path, *, save_format: str = DEFAULT_LLM_SAVE_FORMAT,
                    n_m: tuple[int, int] | None = None) -> list[str]:
    """Fold masks into weights and write ``model`` and ``tokenizer`` (None: none) to ``folder``.

    ``save_format="dense"`` (the default) writes the plain transformers layout in the model's own
    dtype, zeros included: every reader (``AutoModelForCausalLM.from_pretrained`` with or without
    compressed-tensors) loads the identical model. ``"compressed"`` stores every weight that is
    smaller so as a bitmask plus its kept values (2:4 weights in the 2:4 layout when ``n_m`` is 2:4) in
    a folder only :func:`~relprune.llm.load_model` reads and every other reader refuses by name
    (:mod:`relprune.llm.compressed`). Returns the bias switches turned on in the saved config (empty
    unless bias compensation added biases to bias-free projections).

    ``folder`` must be absent or empty (files of an earlier checkpoint beside these would be read with
    them); it is written in full or not at all, with a manifest of every file's SHA-256 that
    :func:`~relprune.llm.load_model` checks, and with the modes the user's umask gives.
    """
    if save_format not in SAVE_FORMATS:
        raise RelpruneError(f"unknown save format {save_format!r}; expected one of {list(SAVE_FORMATS)}")
    require_transformers()
    refuse_occupied(Path(folder), "save_pretrained's folder")
    with staged_folder(folder) as tmp:
        return write_pretrained(model, tokenizer, tmp, save_format=save_format, n_m=n_m)


def write_pretrained(model: nn.Module, tokenizer: Any, folder: Path, *, save_format: str = DEFAULT_LLM_SAVE_FORMAT,
                     n_m: tuple[int, int] | None = None) -> list[str]:
    """:func:`save_pretrained`'s writing, into an empty folder the caller stages (and adds its own files to)."""
    if save_format not in SAVE_FORMATS:
        raise RelpruneError(f"unknown save format {save_format!r}; expected one of {list(SAVE_FORMATS)}")
    switches, zero_bias = bias_switches(model)
    make_permanent(model)
    modules = dict(model.named_modules())
    for name in sorted(zero_bias):
        layer = modules[name]
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                              device=layer.weight.device))
    for flag in switches:
        setattr(model.config, flag, True)
    if save_format == "dense":
        model.save_pretrained(folder)
    else:
        _save_compressed(model, Path(folder), layout_for(n_m))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return switches


def _save_compressed(model: nn.Module, folder: Path, layout: str) -> None:
    """The config (marked compressed), the generation config and the weights with the pruned ones compressed;
    the plain layout when no weight is smaller compressed (a dense or structurally shrunk model)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.numel() and tensor.data_ptr() in seen:  # a tied copy (the head of tied embeddings): stored once
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor
    names = compressible(state, layout)
    if not names:
        model.save_pretrained(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    write_compressed(state, folder, layout, names)
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    mark_compressed(folder, layout, [prefix_of(n) for n in names],
                    zeros / max(sum(t.numel() for t in state.values()), 1))


def refuse_occupied(target: Path, label: str = "") -> None:
    """Refuse an output folder that exists and holds anything (``label`` names it, e.g. "--out")."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RelpruneError(f"{label + ' ' if label else ''}{target} already exists and is not an empty folder; "
                            "choose another")
