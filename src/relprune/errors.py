"""One exception family for the whole library, so callers can catch ``RelpruneError``."""

from __future__ import annotations


class RelpruneError(Exception):
    """Base class of every error relprune raises on purpose."""


class LayerError(RelpruneError, ValueError):
    """A layer name is absent, or names a module relprune cannot prune."""


class NoPrunableLayersError(RelpruneError, ValueError):
    """The model holds no layer relprune knows how to prune."""


class CalibrationError(RelpruneError, ValueError):
    """The calibration data is empty, malformed or lacks what a criterion needs."""


class NonFiniteActivationError(CalibrationError):
    """A NaN or Inf reached a prunable layer during calibration."""


class MissingLabelsError(CalibrationError):
    """A gradient-based criterion was asked for without labelled batches."""


class SparsityError(RelpruneError, ValueError):
    """A sparsity, N:M pattern or threshold is out of range or inconsistent."""


class StatsMismatchError(RelpruneError, ValueError):
    """Statistics or masks do not belong to this model (names or shapes differ)."""


class StatisticNotCollectedError(RelpruneError, KeyError):
    """A statistic was read that ``collect_stats`` was not asked to gather."""

    def __str__(self) -> str:  # KeyError would print the repr with quotes
        return str(self.args[0]) if self.args else ""


class DataError(RelpruneError, ValueError):
    """A data file is missing, corrupt or does not match its checksum."""


class CheckpointError(RelpruneError, ValueError):
    """A checkpoint does not fit the model it is loaded into."""


class IntegrityError(CheckpointError):
    """A file relprune wrote has changed since (its SHA-256, or a stored tensor's, differs from the one recorded)."""


class ShrinkError(RelpruneError, ValueError):
    """A structural shrink would not be exact for this model."""


class ModelLoadError(RelpruneError, ValueError):
    """A model spec cannot be resolved, or its files cannot be loaded (or a needed extra is missing)."""


class SingularGramError(RelpruneError, ValueError):
    """A layer's input second moment is not positive definite even with the damping; ``needed`` is the
    damping (as a share of its mean diagonal) that would make it so, or None when no damping can."""

    def __init__(self, message: str, needed: float | None = None):
        super().__init__(message)
        self.needed = needed
