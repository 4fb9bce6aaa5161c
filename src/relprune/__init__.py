"""relprune: prune PyTorch networks by each weight's measured contribution to its neuron.

Lifecycle: ``collect_stats`` on calibration data -> ``prune`` (masks applied,
held through training) -> ``make_permanent``.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CalibrationError,
    CheckpointError,
    DataError,
    IntegrityError,
    LayerError,
    MissingLabelsError,
    ModelLoadError,
    NonFiniteActivationError,
    NoPrunableLayersError,
    RelpruneError,
    ShrinkError,
    SingularGramError,
    SparsityError,
    StatisticNotCollectedError,
    StatsMismatchError,
)

# The public API loads on first use (PEP 562), so `import relprune` is cheap and the command can
# answer Ctrl-C while torch is still loading. Each name -> the module that defines it.
_LAZY = {
    "CRITERIA": "core.criteria", "register": "core.criteria", "BlindRange": "core.liveness",
    "Masks": "core.masks", "apply_masks": "core.masks", "copy_model": "core.masks",
    "current_masks": "core.masks", "load_state_dict": "core.masks",
    "make_permanent": "core.masks", "sparsity_report": "core.masks",
    "prune": "core.pruning", "Recipe": "core.recipe",
    "STATISTICS": "core.stats", "Stats": "core.stats", "collect_stats": "core.collect",
    "DependencyGraph": "deploy.graph", "prune_groups": "deploy.groups", "output_importance": "deploy.importance",
}
# Submodules reachable as attributes: relprune.shrink.shrink, relprune.llm.prune_sequential, ...
_SUBMODULES = {
    "allocation": "core.allocation", "criteria": "core.criteria", "layers": "core.layers",
    "liveness": "core.liveness", "masks": "core.masks", "pruning": "core.pruning", "stats": "core.stats",
    "export": "deploy.export", "graph": "deploy.graph", "groups": "deploy.groups", "shrink": "deploy.shrink",
    "regularizers": "train.regularizers", "llm": "llm",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


if TYPE_CHECKING:  # what the names are, for type checkers and editors (unused here: F401 off in pyproject)
    from . import llm
    from .core import allocation, criteria, layers, liveness, masks, pruning, stats
    from .core.collect import collect_stats
    from .core.criteria import CRITERIA, register
    from .core.liveness import BlindRange
    from .core.masks import (
        Masks,
        apply_masks,
        copy_model,
        current_masks,
        load_state_dict,
        make_permanent,
        sparsity_report,
    )
    from .core.pruning import prune
    from .core.recipe import Recipe
    from .core.stats import STATISTICS, Stats
    from .deploy import export, graph, groups, shrink
    from .deploy.graph import DependencyGraph
    from .deploy.groups import prune_groups
    from .deploy.importance import output_importance
    from .train import regularizers

__version__ = "0.1.0"

#: The public names: the errors above, the lazy table's names and submodules (one spelling each).
__all__ = sorted({*(n for n, v in globals().items() if isinstance(v, type) and issubclass(v, RelpruneError)),
                  *_LAZY, *_SUBMODULES, "__version__"})
