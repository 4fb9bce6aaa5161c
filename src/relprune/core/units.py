"""Coupled units and the structured scores: what one removable channel (or head) spans, and what it is worth.

A :class:`Group` is units that must be removed together; its :class:`Member` s say where each unit lives
(rows, columns or per-channel entries of a module). The traced dependency graph
(:mod:`relprune.deploy.graph`) finds the groups of any network; a decoder's attention heads and MLP
channels are read from its architecture (:mod:`relprune.llm.structured`). Either way the same registered
scores value them, summed over every place a unit lives (larger is kept):

* ``rc`` - ours: the channel's total relative contribution E[r] to the layers that consume it;
* ``share`` - ours: the channel's share of each consuming output's contribution variance, summed;
* ``fluctuation`` - FLAP (An et al. 2024): Var[x_c] ||W[:, c]||^2 over its consumers, i.e. the
  variance of its contributions;
* ``l1`` / ``l2`` - the group norm of every weight, bias and norm entry of the channel
  (Torch-Pruning's magnitude importance); ``taylor`` - sum |W dL/dW| over them; ``random``.

A new score is one function and :func:`register_group_score`; every structured command, the API and the
benchmarks take it from :data:`GROUP_SCORES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import RelpruneError, StatisticNotCollectedError
from .stats import LayerStats, Stats


@dataclass
class Member:
    """One place a group's units live: rows (``out``), columns (``in``) or per-channel entries.

    ``offset`` is where the group's entries start along that dimension; ``expand`` how many
    consecutive entries each channel covers there (after a flatten: one per spatial position);
    ``repeat`` how many copies of each unit follow one another there, ``size * expand`` entries
    apart (a folded space: unit k is channel k of each of a grouped convolution's groups).
    """

    module: str
    role: str  # "out" | "in" | "depthwise" | "norm"
    offset: int
    expand: int = 1
    repeat: int = 1

    def index(self, size: int) -> Tensor:
        """(size, repeat * expand) entry indices: row k lists every entry unit k covers here."""
        unit = torch.arange(size).view(size, 1, 1) * self.expand
        copy = torch.arange(self.repeat).view(1, -1, 1) * (size * self.expand)
        within = torch.arange(self.expand).view(1, 1, -1)
        return (self.offset + unit + copy + within).reshape(size, -1)


@dataclass
class Group:
    """Channels that must be removed together; ``members`` say where each one lives."""

    size: int
    members: list[Member] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.refusals and any(m.role in ("out", "depthwise") for m in self.members)

    @property
    def reason(self) -> str:
        return "; ".join(dict.fromkeys(self.refusals)) or "no layer produces these channels"

    def describe(self) -> str:
        produced = sorted({m.module for m in self.members if m.role in ("out", "depthwise")})
        return f"channels of {', '.join(produced) or '(model input)'}"


MemberScore = Callable[[nn.Module, Member, int, Stats | None], Tensor]


@dataclass(frozen=True)
class GroupScore:
    """A named channel score: per member of a group, one value per channel (summed over members); a score
    without a member function (``random``) draws a whole group's values at once instead."""

    name: str
    statistics: tuple[str, ...]
    member: MemberScore | None = None


#: Channel scores by name (larger kept), as ``relprune.CRITERIA`` is for weights.
GROUP_SCORES: dict[str, GroupScore] = {}


def register_group_score(name: str, *, statistics: tuple[str, ...] = ()) -> Callable[[MemberScore], MemberScore]:
    """Decorator adding a member score function to :data:`GROUP_SCORES`."""

    def wrap(fn: MemberScore) -> MemberScore:
        GROUP_SCORES[name] = GroupScore(name, statistics, fn)
        return fn

    return wrap


def group_score(name: str) -> GroupScore:
    """The registered channel score ``name``, or an error listing the registered ones."""
    if name not in GROUP_SCORES:
        raise RelpruneError(f"structured score must be one of {tuple(GROUP_SCORES)}, got {name!r}")
    return GROUP_SCORES[name]


def score_groups(groups: Sequence[Group], modules: Mapping[str, nn.Module], stats: Stats | None, criterion: str,
                 generator: torch.Generator) -> dict[int, Tensor]:
    """Per prunable group of ``groups`` (by index), one score per channel (float64): the member scores of
    ``criterion`` summed over the places each channel lives (``modules`` by the members' names). Any
    coupled groups take it: the traced graph's, or a decoder's heads and MLP channels read from the
    architecture. ``generator`` draws the random score's values, group after group."""
    score = group_score(criterion)
    out: dict[int, Tensor] = {}
    for gi, group in enumerate(groups):
        if not group.prunable:
            continue
        if score.member is None:
            out[gi] = torch.rand(group.size, generator=generator, dtype=torch.float64)
            continue
        scores = torch.zeros(group.size, dtype=torch.float64)
        for m in group.members:
            scores += score.member(modules[m.module], m, group.size, stats)
        out[gi] = scores
    return out


def member_stats(stats: Stats | None, name: str, criterion: str) -> LayerStats:
    """Layer ``name``'s statistics, or an error naming what score ``criterion`` needs collected."""
    if stats is None or name not in stats:
        raise StatisticNotCollectedError(
            f"group criterion {criterion!r} needs statistics {list(GROUP_SCORES[criterion].statistics)} of layer "
            f"{name!r}; collect them with collect_stats")
    return stats[name]


def _in_units(t: Tensor) -> Tensor:
    """(O, I, *kernel) -> (O, I), summing over the kernel; Linear weights pass unchanged."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(2) if t.dim() > 2 else t


def _reader_score(module: nn.Module, m: Member, size: int, value: Tensor) -> Tensor:
    """A weight-shaped statistic of the layer that reads the channels, summed per channel (readers only)."""
    w = module.weight
    value = _in_units(value)
    value = value.expand(w.shape[0], -1) if value.shape[0] == 1 else value
    return value.sum(0)[m.index(size)].sum(1)


@register_group_score("rc", statistics=("relative_mean",))
def _rc(module: nn.Module, m: Member, size: int, stats: Stats | None) -> Tensor:
    """Ours: the channel's total relative contribution E[r] to the layers that read it."""
    if m.role != "in":
        return torch.zeros(size, dtype=torch.float64)
    return _reader_score(module, m, size, member_stats(stats, m.module, "rc").relative_mean)


@register_group_score("fluctuation", statistics=("contribution_std", "contribution_mean"))
def _fluctuation(module: nn.Module, m: Member, size: int, stats: Stats | None) -> Tensor:
    """FLAP's: Var[x_c] ||W[:, c]||^2 over the layers that read the channel."""
    if m.role != "in":
        return torch.zeros(size, dtype=torch.float64)
    return _reader_score(module, m, size, member_stats(stats, m.module, "fluctuation").contribution_std ** 2)


@register_group_score("share", statistics=("contribution_std", "contribution_mean"))
def _share(module: nn.Module, m: Member, size: int, stats: Stats | None) -> Tensor:
    """Ours: the channel's share of each output's contribution variance, Var[c_oc] / sum_k Var[c_ok], summed
    over the outputs of the layers that read it (FLAP's fluctuation made relative per output)."""
    if m.role != "in":
        return torch.zeros(size, dtype=torch.float64)
    var = _in_units(member_stats(stats, m.module, "share").contribution_std ** 2)
    return _reader_score(module, m, size, var / var.sum(1, keepdim=True).clamp_min(1e-300))


def _entries(module: nn.Module, m: Member, size: int, a: Tensor, bias: Tensor | None) -> Tensor:
    """Per channel, the sum of ``a`` (weight-shaped) over the channel's rows, columns or norm entries."""
    if m.role == "norm" or m.role in ("out", "depthwise"):
        rows = a.reshape(a.shape[0], -1).sum(1)
        if bias is not None:
            rows = rows + bias
        return rows[m.index(size)].sum(1)
    return _in_units(a).sum(0)[m.index(size)].sum(1)


def _norm_score(p: int) -> MemberScore:
    def score(module: nn.Module, m: Member, size: int, stats: Stats | None) -> Tensor:
        bias = getattr(module, "bias", None)
        a = module.weight.detach().double().abs().pow(p)
        b = None if bias is None or m.role == "in" else bias.detach().double().abs().pow(p)
        return _entries(module, m, size, a, b)
    score.__doc__ = f"The L{p} norm of every weight (and bias) of the channel."
    return score


register_group_score("l1")(_norm_score(1))
register_group_score("l2")(_norm_score(2))


@register_group_score("taylor", statistics=("weight_grad",))
def _taylor(module: nn.Module, m: Member, size: int, stats: Stats | None) -> Tensor:
    """|W * dLoss/dW| summed over the channel's weights (norm layers add nothing)."""
    if m.role == "norm":
        return torch.zeros(size, dtype=torch.float64)
    s = member_stats(stats, m.module, "taylor")
    return _entries(module, m, size, (s.checked_weight().double() * s.weight_grad).abs(), None)


GROUP_SCORES["random"] = GroupScore("random", ())


def score_names(*, gradients: bool = True) -> tuple[str, ...]:
    """The registered structured scores' names; ``gradients=False``: only those that need no loss gradient
    (what the commands and block-by-block passes offer: they compute none)."""
    return tuple(n for n, s in GROUP_SCORES.items() if gradients or "weight_grad" not in s.statistics)
