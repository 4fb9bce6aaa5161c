"""Writing a pruned language model as a folder plain transformers loads.

Bias compensation gives bias-free projections a bias; transformers builds a bias only where the
config asks for one (Llama-style ``attention_bias`` and ``mlp_bias`` switch them on per group of
projections). So before saving, the switches that cover the new biases are turned on and the
other projections they govern get zero biases, which change no output.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.compressed import layout_for, prefix_of
from ..core.masks import make_permanent
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


def save_pretrained(model: nn.Module, tokenizer: Any, folder: str | Path, *, save_format: str = "compressed",
                    n_m: tuple[int, int] | None = None) -> list[str]:
    """Fold masks into weights and write ``model`` and ``tokenizer`` (None: none) to ``folder``.

    ``save_format="compressed"`` (the default) stores every weight that is smaller so as a bitmask
    plus its kept values (2:4 weights in the 2:4 layout when ``n_m`` is 2:4), in compressed-tensors'
    sparse format (:mod:`relprune.llm.compressed`; :func:`~relprune.llm.load_model` reads it);
    ``"dense"`` writes the plain transformers layout, zeros included. Returns the bias switches turned
    on in the saved config (empty unless bias compensation added biases to bias-free projections).
    """
    if save_format not in SAVE_FORMATS:
        raise RelpruneError(f"unknown save format {save_format!r}; expected one of {list(SAVE_FORMATS)}")
    require_transformers()
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


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A fresh folder beside ``target`` to write into: it becomes ``target`` (absent or empty) when
    the block ends, and is removed when the block raises, so nothing half-written is ever at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
