"""A pruning recipe: what to remove and how, checked once, with the statistics it needs.

Every entry point builds one (``prune``'s keyword arguments, the language-model drivers, the
bench's methods, both commands), so a recipe is refused the same way, with the same words,
wherever it is given, and the statistics it needs are derived in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..defaults import DEFAULT_CRITERION, DEFAULT_SCOPE, DEFAULT_SEARCH_EVALUATIONS
from ..errors import RelpruneError, SparsityError
from .allocation import SCOPES, check_sparsity, parse_n_m
from .checks import real_number
from .criteria import Criterion, get_criterion
from .reconstruct import REFITS
from .search import check_search_budget

#: How a block-by-block driver spreads a sparsity over the blocks.
ALLOCATIONS = ("uniform", "owl", "entropy", "errors", "search")
#: The highest sparsity the per-layer allocations (errors, search) give a layer.
LEVEL_CEILING = 0.99
#: OWL's lambda (each block's sparsity within sparsity +- lambda) lies in [0, OWL_LAMBDA_LIMIT).
OWL_LAMBDA_LIMIT = 0.5


def owl_lambda_problem(value: float) -> str | None:
    """Why ``value`` cannot be OWL's lambda, or None (one rule for the API and both commands)."""
    return None if 0.0 <= value < OWL_LAMBDA_LIMIT else f"must lie in [0, {OWL_LAMBDA_LIMIT:g})"


@dataclass(frozen=True)
class Recipe:
    """One pruning recipe. Build it with :meth:`build` (which validates); fields are normalised.

    Exactly one budget: ``sparsity`` (with ``scope``: ``"global"``, ``"layer"`` or ``"row"``),
    ``n_m`` (``"2:4"``) or ``threshold`` (remove shares below threshold / fan-in). ``scope=None``
    is the entry point's default (global; row in block-by-block pruning) and the only value a
    criterion that chooses its own mask (SparseGPT) takes. ``reconstruct`` re-fits the kept weights
    (``"exact"`` or ``"obs"``); ``bias_compensation`` folds the removed mean into the bias instead.
    ``refine`` swaps pruned and kept weights within rows while the output error falls
    (:mod:`relprune.core.refine`), after a criterion's mask and before any re-fit.
    ``allocation="owl"`` gives each block of a block-by-block driver its own sparsity within
    ``sparsity +- owl_lambda`` by its outlier ratio; ``"errors"`` gives each layer its own, within the same
    bounds, by the layers' output-error curves from their input Grams (least total error for the budget,
    :func:`relprune.core.allocation.sparsities_by_errors`); ``"entropy"`` by the effective share of weights
    its outputs rest on (the contribution entropy; fewer, more removed), within the same bounds.
    ``"search"`` starts from ``"errors"`` and moves sparsity between the blocks' attention and MLP parts by a
    search scored by the model's KL divergence from the dense model, in at most ``search_evaluations``
    candidates and ``search_seconds`` (:mod:`relprune.llm.search`; in-memory models only).
    ``options`` are the criterion's own (``ucb_k``, ``importance``).
    """

    criterion: str = DEFAULT_CRITERION
    sparsity: float | None = None
    n_m: str | None = None
    threshold: float | None = None
    scope: str | None = None
    reconstruct: str | None = None
    bias_compensation: bool = False
    refine: bool = False
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    search_evaluations: int = DEFAULT_SEARCH_EVALUATIONS
    search_seconds: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, *, criterion: str | Criterion = DEFAULT_CRITERION, sparsity: float | None = None,
              n_m: str | tuple[int, int] | None = None, threshold: float | None = None, scope: str | None = None,
              reconstruct: bool | str | None = None, bias_compensation: bool = False, refine: bool = False,
              allocation: str = "uniform",
              owl_lambda: float = 0.08, owl_m: float = 5.0, search_evaluations: int = DEFAULT_SEARCH_EVALUATIONS,
              search_seconds: float | None = None, options: Mapping[str, Any] | None = None) -> Recipe:
        """A validated recipe from the spelled-out arguments (``reconstruct=True`` means ``"exact"``)."""
        if reconstruct not in (False, True, None) and reconstruct not in REFITS:
            raise RelpruneError(f"reconstruct must be None/False, True (exact) or one of {tuple(REFITS)}, got "
                                f"{reconstruct!r}")
        refit = "exact" if reconstruct is True else (reconstruct or None)
        name = criterion.name if isinstance(criterion, Criterion) else criterion
        if n_m is not None:
            n, m = parse_n_m(n_m)
            n_m = f"{n}:{m}"
        recipe = cls(criterion=name, sparsity=sparsity, n_m=n_m, threshold=threshold, scope=scope,
                     reconstruct=refit, bias_compensation=bool(bias_compensation), refine=bool(refine),
                     allocation=allocation,
                     owl_lambda=owl_lambda, owl_m=owl_m, search_evaluations=search_evaluations,
                     search_seconds=search_seconds, options=dict(options or {}))
        return recipe.validate()

    @classmethod
    def given(cls, recipe: Recipe | None, keywords: Mapping[str, Any], **defaults: Any) -> Recipe:
        """The recipe an entry point was given: ``recipe``, or one built (and validated) from its keyword
        arguments, ``defaults`` filling those not given and any keyword that is not a field of the recipe
        taken as the criterion's option (``ucb_k=``). Both at once are refused."""
        if recipe is not None:
            if keywords:
                raise RelpruneError("give either recipe= or the recipe's keyword arguments, not both")
            if not isinstance(recipe, Recipe):
                raise RelpruneError(f"recipe must be a relprune Recipe, got {type(recipe).__name__}")
            return recipe.validate()
        own = {f.name for f in fields(cls)} - {"options"}
        spelled = {**defaults, **{k: v for k, v in keywords.items() if k in own}}
        options = {**keywords.get("options", {}), **{k: v for k, v in keywords.items() if k not in own | {"options"}}}
        return cls.build(**spelled, options=options)

    @property
    def crit(self) -> Criterion:
        return get_criterion(self.criterion)

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.n_m is None else parse_n_m(self.n_m)

    def validate(self) -> Recipe:
        """Every check that needs no model: raises a RelpruneError subclass naming what is wrong."""
        crit = self.crit
        unknown = sorted(set(self.options) - crit.options)
        if unknown:
            takes = f"takes only {sorted(crit.options)}" if crit.options else "takes no options"
            raise RelpruneError(f"criterion {crit.name!r} {takes}; got {unknown}")
        budgets = [b for b in (self.sparsity, self.n_m, self.threshold) if b is not None]
        if len(budgets) != 1:
            raise SparsityError("give one budget: a sparsity, an N:M pattern or a threshold"
                                + (f", not {len(budgets)}" if budgets else ""))
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        if self.n_m is not None:
            parse_n_m(self.n_m)
        if self.threshold is not None and not (real_number(self.threshold, "the threshold") > 0
                                               and math.isfinite(self.threshold)):
            raise SparsityError(f"the threshold must be a positive number, got {self.threshold!r}")
        if self.scope is not None and crit.joint is not None:
            raise SparsityError(f"criterion {crit.name!r} chooses its mask together with the weights; "
                                "a scope does not apply to it: leave it out")
        if self.scope is not None and self.scope not in SCOPES:
            raise SparsityError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.threshold is not None and crit.joint is not None:
            raise SparsityError(f"criterion {crit.name!r} chooses its own mask; give a sparsity or an N:M pattern")
        if self.threshold is not None and not crit.relative:
            raise SparsityError(f"threshold mode compares scores with shares of a neuron's input; criterion "
                                f"{crit.name!r} is not on that scale (use rc, rc-ucb or contrib-share)")
        if self.reconstruct is not None and self.reconstruct not in REFITS:
            raise RelpruneError(f"reconstruct must be None or one of {tuple(REFITS)}, got {self.reconstruct!r}")
        if self.reconstruct and self.bias_compensation:
            raise RelpruneError("the re-fit already restores the removed mean, so bias compensation would "
                                "correct it twice: use one of them")
        if self.refine and crit.joint is not None:
            raise SparsityError(f"criterion {crit.name!r} chooses its mask with the weights; refine= applies to "
                                "masks chosen by a score")
        if self.refine and self.threshold is not None:
            raise SparsityError("refine= swaps weights within rows at a fixed count; give a sparsity or an N:M "
                                "pattern, not a threshold")
        if self.allocation not in ALLOCATIONS:
            raise SparsityError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation != "uniform" and self.sparsity is None:
            raise SparsityError(f"{self.allocation} allocation sets unstructured sparsities per block: give a "
                                "sparsity, not an N:M pattern or a threshold")
        problem = owl_lambda_problem(real_number(self.owl_lambda, "OWL's lambda"))
        if problem:
            raise SparsityError(f"OWL's lambda {problem}, got {self.owl_lambda}")
        if not real_number(self.owl_m, "OWL's outlier multiple") > 0:
            raise SparsityError(f"OWL's outlier multiple must be positive, got {self.owl_m}")
        if self.allocation in ("errors", "search") and self.owl_lambda == 0:
            raise SparsityError(f"the {self.allocation} allocation moves sparsity between layers within sparsity "
                                "+- lambda: give a lambda above 0")
        if self.allocation in ("errors", "search") and self.sparsity is not None and self.sparsity > LEVEL_CEILING:
            raise SparsityError(f"a sparsity of {self.sparsity} cannot be met by the {self.allocation} allocation, "
                                f"whose layers stop at {LEVEL_CEILING}: give a lower sparsity or --allocation uniform")
        check_search_budget(self.search_evaluations, self.search_seconds)
        return self

    @property
    def uses_gram(self) -> bool:
        """Whether the re-fit, the refinement or a joint criterion reads the input Gram matrix."""
        return bool(self.reconstruct or self.refine or self.crit.joint is not None)

    @property
    def reads_activations(self) -> bool:
        """Whether a block-by-block driver must capture block inputs (statistics, or a per-block allocation)."""
        return bool(self.statistics()) or self.allocation != "uniform"

    def statistics(self) -> frozenset[str]:
        """The statistics ``collect_stats`` must gather for this recipe."""
        wanted = set(self.crit.statistics)
        if self.uses_gram:
            wanted.add("input_gram")
        if self.bias_compensation:
            wanted.add("contribution_mean")
        return frozenset(wanted)

    def with_scope(self, default: str) -> Recipe:
        """The recipe with its comparison group resolved (a joint criterion keeps none)."""
        if self.scope is not None or self.crit.joint is not None:
            return self
        return replace(self, scope=default)

    @property
    def resolved_scope(self) -> str:
        return self.scope or DEFAULT_SCOPE
