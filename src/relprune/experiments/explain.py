"""The interpretable view: how each layer's weights share their neurons' inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..core.layers import weight_matrix
from ..core.stats import LayerStats, Stats


def neuron_entropy(relative_mean: Tensor) -> Tensor:
    """Per neuron, H(q_i) / log I with q_i = E[r_i.] normalised to sum 1 (1: uniform, 0: one input).

    NaN for a neuron whose shares are all zero (never live on the calibration data).
    """
    q = weight_matrix(relative_mean).double()
    total = q.sum(1, keepdim=True)
    q = q / total.clamp_min(1e-300)
    h = -(q * q.clamp_min(1e-300).log()).sum(1)
    h = h / math.log(q.shape[1]) if q.shape[1] > 1 else torch.zeros_like(h)
    return torch.where(total.squeeze(1) > 0, h, torch.full_like(h, math.nan))


@dataclass
class LayerSummary:
    name: str
    shape: tuple[int, ...]
    live_fraction: float
    median_share: float
    below_threshold: float
    mean_entropy: float
    dead_neurons: int


def summarise(stats: Stats, tau: float = 0.1, ucb_k: float = 1.0) -> list[LayerSummary]:
    """Per layer: live fraction, median share of a weight relative to uniform 1/I,
    fraction of weights whose upper bound E[r]+k Std[r] is below tau/I, mean neuron entropy."""
    out = []
    for name, ls in stats.items():
        share = weight_matrix(ls.relative_mean)
        fan_in = share.shape[1]
        ucb = weight_matrix(ls.relative_mean + ucb_k * ls.relative_std)
        live = float(ls.live_count.mean() / max(ls.total_count, 1))
        entropy = neuron_entropy(ls.relative_mean)
        out.append(LayerSummary(name, tuple(ls.weight.shape), live, float((share * fan_in).median()),
                                float((ucb < tau / fan_in).double().mean()),
                                float(entropy.nanmean()), int(entropy.isnan().sum())))
    return out


def format_summary(rows: list[LayerSummary], tau: float) -> str:
    header = (f"{'layer':12} {'shape':>14} {'live':>6} {'median share x I':>16} {'ucb < tau/I':>12} "
              f"{'entropy':>8} {'dead':>5}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:12} {'x'.join(map(str, r.shape)):>14} {r.live_fraction:6.1%} "
                     f"{r.median_share:16.3f} {r.below_threshold:12.1%} {r.mean_entropy:8.3f} {r.dead_neurons:5d}")
    lines.append(f"(share x I = 1 means the uniform share; tau = {tau:g}; entropy: mean over neurons live at "
                 "least once; dead: neurons never live on the calibration data)")
    return "\n".join(lines)


def plot_explain(stats: Stats, path: str | Path, ucb_k: float = 1.0) -> Path:
    """Three panels per layer: histogram of E[r] x I, fraction under tau/I vs tau, neuron entropy histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 2.8 * len(names)), squeeze=False)
    taus = torch.logspace(-3, 1, 60, dtype=torch.float64)
    for i, name in enumerate(names):
        ls: LayerStats = stats[name]
        share = weight_matrix(ls.relative_mean)
        fan_in = share.shape[1]
        rel = (share * fan_in).flatten().clamp_min(1e-6)
        axes[i][0].hist(rel.log10().numpy(), bins=60, color="tab:blue")
        axes[i][0].axvline(0, color="k", lw=1, ls="--")
        axes[i][0].set_title(f"{name}: log10(E[r] x I)", fontsize=9)
        ucb = weight_matrix(ls.relative_mean + ucb_k * ls.relative_std) * fan_in
        frac = [(ucb < t).double().mean().item() for t in taus]
        axes[i][1].semilogx(taus.numpy(), frac, color="tab:red")
        axes[i][1].set_title(f"{name}: share of weights with E[r]+{ucb_k:g}Std[r] < tau/I", fontsize=9)
        axes[i][1].set_xlabel("tau")
        axes[i][1].set_ylim(0, 1)
        axes[i][1].grid(alpha=0.3)
        entropy = neuron_entropy(ls.relative_mean)
        axes[i][2].hist(entropy[~entropy.isnan()].numpy(), bins=40, range=(0, 1), color="tab:green")
        axes[i][2].set_title(f"{name}: per-neuron contribution entropy H(q)/log I", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
