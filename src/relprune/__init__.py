"""relprune: prune PyTorch networks by each weight's measured contribution to its neuron.

Lifecycle: ``collect_stats`` on calibration data -> ``prune`` (masks applied,
held through training) -> ``make_permanent``.
"""

import sys as _sys

from .core import allocation, criteria, layers, liveness, masks, pruning, stats
from .core.criteria import CRITERIA, Criterion, register
from .core.liveness import RELU, RELU6, BlindRange, hardtanh
from .core.masks import (
    LayerReport,
    Masks,
    apply_masks,
    copy_model,
    current_masks,
    format_report,
    load_state_dict,
    make_permanent,
    sparsity_report,
)
from .core.pruning import prune
from .core.stats import STATISTICS, LayerStats, Stats, collect_stats
from .deploy import export, graph, groups, shrink, structured
from .deploy.graph import DependencyGraph
from .deploy.groups import prune_groups
from .deploy.importance import output_importance
from .errors import (
    CalibrationError,
    CheckpointError,
    DataError,
    LayerError,
    MissingLabelsError,
    ModelLoadError,
    NonFiniteActivationError,
    NoPrunableLayersError,
    RelpruneError,
    ShrinkError,
    SparsityError,
    StatisticNotCollectedError,
    StatsMismatchError,
)
from .train import regularizers

# The modules' paths before the split into core/train/deploy (0.1.0) keep importing for one
# release: ``from relprune.shrink import shrink`` still works.
for _module in (allocation, criteria, layers, liveness, masks, pruning, stats, regularizers,
                export, shrink, structured):
    _sys.modules.setdefault(f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}", _module)
del _module

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "RELU",
    "RELU6",
    "STATISTICS",
    "BlindRange",
    "CalibrationError",
    "CheckpointError",
    "Criterion",
    "DataError",
    "DependencyGraph",
    "LayerError",
    "LayerReport",
    "LayerStats",
    "Masks",
    "MissingLabelsError",
    "ModelLoadError",
    "NoPrunableLayersError",
    "NonFiniteActivationError",
    "RelpruneError",
    "ShrinkError",
    "SparsityError",
    "StatisticNotCollectedError",
    "Stats",
    "StatsMismatchError",
    "__version__",
    "apply_masks",
    "collect_stats",
    "copy_model",
    "current_masks",
    "export",
    "format_report",
    "graph",
    "groups",
    "hardtanh",
    "load_state_dict",
    "make_permanent",
    "output_importance",
    "prune",
    "prune_groups",
    "register",
    "regularizers",
    "shrink",
    "sparsity_report",
    "structured",
]
