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

from ..core.masks import make_permanent
from ..errors import RelpruneError
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
    config = copy.deepcopy(model.config)
    built = _biased_linears(type(model), config)
    switches = []
    for flag in BIAS_SWITCHES:
        if not (have - built):
            break
        if getattr(config, flag, None) is False:
            trial = copy.deepcopy(config)
            setattr(trial, flag, True)
            gained = _biased_linears(type(model), trial) - built
            if gained & (have - built):
                config, built, switches = trial, built | gained, [*switches, flag]
    unexpressed = sorted(have - built)
    if unexpressed:
        raise RelpruneError(
            f"{type(model).__name__}'s config has no switch for biases on {unexpressed[:3]}"
            f"{' ...' if len(unexpressed) > 3 else ''}, so a transformers folder cannot hold the compensated "
            "biases; prune without bias compensation")
    return switches, built - have


def save_pretrained(model: nn.Module, tokenizer: Any, folder: str | Path) -> list[str]:
    """Fold masks into weights and write ``model`` and ``tokenizer`` (None: none) to ``folder`` for transformers.

    Returns the bias switches turned on in the saved config (empty unless bias compensation added
    biases to bias-free projections).
    """
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
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return switches


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
