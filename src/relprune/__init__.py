"""relprune: prune PyTorch networks by each weight's measured contribution to its neuron.

Lifecycle: ``collect_stats`` on calibration data -> ``prune`` (masks applied,
held through training) -> ``make_permanent``.
"""

from . import export, regularizers, shrink, structured
from .criteria import CRITERIA, Criterion, register
from .errors import (
    CalibrationError,
    CheckpointError,
    DataError,
    LayerError,
    MissingLabelsError,
    NonFiniteActivationError,
    NoPrunableLayersError,
    RelpruneError,
    ShrinkError,
    SparsityError,
    StatisticNotCollectedError,
    StatsMismatchError,
)
from .liveness import RELU, RELU6, BlindRange, hardtanh
from .masks import (
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
from .pruning import prune
from .stats import STATISTICS, LayerStats, Stats, collect_stats

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
    "LayerError",
    "LayerReport",
    "LayerStats",
    "Masks",
    "MissingLabelsError",
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
    "hardtanh",
    "load_state_dict",
    "make_permanent",
    "prune",
    "register",
    "regularizers",
    "shrink",
    "sparsity_report",
    "structured",
]
