"""Results files -> tables and plots: mean and std over seeds per cell, best marked."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

GROUP_FIELDS = ("model", "dataset", "regime", "calib_samples", "pat", "pat_alpha")


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines results file; a torn last line (interrupted write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


def group_title(group: tuple) -> str:
    fields = dict(zip(GROUP_FIELDS, group, strict=True))
    title = f"{fields['model']} on {fields['dataset']}, {fields['regime']}"
    extras = [f"calibration {fields['calib_samples']} samples"]
    if fields["pat"] not in (None, "none"):
        extras.append(f"PAT {fields['pat']} alpha={fields['pat_alpha']:g}")
    return f"{title} ({', '.join(extras)})"


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[float, list[float]]]]:
    """group -> method label -> sparsity -> accuracies over seeds."""
    out: dict[tuple, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        group = tuple(r.get(f) for f in GROUP_FIELDS)
        out[group][r["method"]][round(r["sparsity"], 6)].append(r["accuracy"])
    return out


def dense_accuracy(rows: list[dict[str, Any]], group: tuple) -> tuple[float, float, int]:
    fields = dict(zip(GROUP_FIELDS, group, strict=True))
    per_seed = {r["seed"]: r["dense_accuracy"] for r in rows
                if all(r.get(k) == fields[k] for k in ("model", "dataset", "pat", "pat_alpha"))}
    vals = list(per_seed.values())
    return (mean(vals), pstdev(vals), len(vals)) if vals else (math.nan, math.nan, 0)


def _cell(vals: list[float]) -> str:
    return f"{100 * mean(vals):.2f} ± {100 * pstdev(vals):.2f}" if len(vals) > 1 else f"{100 * vals[0]:.2f}"


def markdown_tables(rows: list[dict[str, Any]]) -> str:
    """One table per (model, dataset, regime, ...) group: rows methods, columns sparsities, best in bold."""
    agg = aggregate(rows)
    parts = []
    for group in sorted(agg, key=lambda g: tuple(str(x) for x in g)):
        methods = agg[group]
        sparsities = sorted({s for per in methods.values() for s in per})
        best = {s: max((mean(per[s]) for per in methods.values() if s in per), default=math.nan) for s in sparsities}
        d_mean, d_std, d_n = dense_accuracy(rows, group)
        seeds = max((len(v) for per in methods.values() for v in per.values()), default=0)
        parts.append(f"### {group_title(group)}\n")
        parts.append(f"Dense accuracy {100 * d_mean:.2f} ± {100 * d_std:.2f} % over {d_n} seeds; "
                     f"cells: test accuracy %, mean ± std over {seeds} seeds; best per column in bold.\n")
        header = "| method | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |"
        parts.append(header)
        parts.append("|---|" + "---:|" * len(sparsities))
        # Methods covering more sparsities first (N:M rows have one), then by mean accuracy.
        order = sorted(methods, key=lambda m: (-len(methods[m]), -mean(mean(v) for v in methods[m].values())))
        for m in order:
            cells = []
            for s in sparsities:
                vals = methods[m].get(s)
                if not vals:
                    cells.append("")
                    continue
                text = _cell(vals)
                cells.append(f"**{text}**" if math.isclose(mean(vals), best[s], abs_tol=1e-12) else text)
            parts.append(f"| {m} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def plot_accuracy(rows: list[dict[str, Any]], path: str | Path, max_methods: int = 10) -> Path:
    """accuracy vs sparsity: a panel per (model, dataset) and regime, a line per method, std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    panels = sorted({(g[0], g[1]) for g in agg})
    regimes = sorted({g[2] for g in agg})
    fig, axes = plt.subplots(len(regimes), len(panels), figsize=(5.2 * len(panels), 3.8 * len(regimes)),
                             squeeze=False)
    for i, regime in enumerate(regimes):
        for j, (model, dataset) in enumerate(panels):
            ax = axes[i][j]
            groups = [g for g in agg if g[:3] == (model, dataset, regime)]
            if not groups:
                ax.text(0.5, 0.5, f"{model} / {dataset}: no {regime} cells", ha="center", va="center", fontsize=9)
                ax.set_axis_off()
                continue
            for group in groups[:1]:
                methods = agg[group]
                ranked = sorted(methods, key=lambda m: -mean(mean(v) for v in methods[m].values()))
                for m in ranked[:max_methods]:
                    xs = sorted(methods[m])
                    ys = [100 * mean(methods[m][x]) for x in xs]
                    es = [100 * pstdev(methods[m][x]) for x in xs]
                    ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o", ms=3, capsize=3, label=m)
                d_mean, _, _ = dense_accuracy(rows, group)
                if not math.isnan(d_mean):
                    ax.axhline(100 * d_mean, color="grey", ls="--", lw=1, label="dense")
            ax.set_title(f"{model} / {dataset} — {regime}", fontsize=10)
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict[str, Any]], folder: str | Path, preamble: str = "") -> tuple[Path, Path]:
    """report.md and accuracy_vs_sparsity.png in ``folder``."""
    folder = Path(folder)
    md = folder / "report.md"
    md.write_text("# relprune benchmark report\n\n" + preamble + "\n" + markdown_tables(rows))
    png = plot_accuracy(rows, folder / "accuracy_vs_sparsity.png")
    return md, png
