"""The pruning-aware-training ablation of docs/results.md, from runs/pat.

For each model and PAT setting: dense test accuracy and mean per-neuron contribution entropy
H(q)/log I before pruning (1,024 calibration samples, liveness on), mean ± std over seeds; then
the pruned accuracies (one-shot and fine-tuned) per criterion and sparsity, and a plot.

    python benchmarks/pat_report.py [--out runs/pat] [--img docs/img]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

import torch

import relprune
from relprune.experiments.data import load_dataset
from relprune.experiments.experiment import load_model
from relprune.experiments.explain import neuron_entropy
from relprune.experiments.report import load_results
from relprune.experiments.training import calibration_batches


def label(pat: str, alpha: float) -> str:
    return "none" if pat == "none" else f"{pat} {alpha:g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pat")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--data-dir", default="../shared/data")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = load_results(Path(args.out) / "results.jsonl")
    dense_info = defaultdict(list)
    data_cache = {}
    for folder in sorted((Path(args.out) / "dense").iterdir()):
        if not (folder / "model.json").is_file():
            continue
        model, info = load_model(folder)
        key = (info.dataset, info.seed)
        if key not in data_cache:
            data_cache[key] = load_dataset(info.dataset, args.data_dir, seed=info.seed)
        calib = calibration_batches(data_cache[key].train, 1024, seed=info.seed)
        stats = relprune.collect_stats(model, calib, statistics=["relative_mean"])
        entropy = float(torch.cat([neuron_entropy(s.relative_mean) for s in stats.values()]).nanmean())
        dense_info[(info.model, info.dataset, label(info.extra["pat"], info.extra["pat_alpha"]))].append(
            (info.metrics["test_acc"], entropy))
    print("### Dense models\n")
    print("| model | PAT | dense test acc % | mean neuron entropy H(q)/log I |\n|---|---|---:|---:|")
    for (model, dataset, pat), vals in sorted(dense_info.items()):
        accs, ents = [v[0] for v in vals], [v[1] for v in vals]
        print(f"| {model}/{dataset} | {pat} | {100 * mean(accs):.2f} ± {100 * pstdev(accs):.2f} | "
              f"{mean(ents):.3f} ± {pstdev(ents):.3f} |")
    print()
    table = defaultdict(lambda: defaultdict(list))
    for r in rows:
        table[(r["model"], r["dataset"], r["regime"], r["method"])][(label(r["pat"], r["pat_alpha"]),
                                                                     r["sparsity"])].append(r["accuracy"])
    for (model, dataset, regime, method), cells in sorted(table.items()):
        pats = sorted({k[0] for k in cells}, key=lambda x: (x != "none", x))
        sps = sorted({k[1] for k in cells})
        print(f"### {model}/{dataset}, {regime}, pruned by {method}\n")
        print("| PAT | " + " | ".join(f"{100 * s:g}%" for s in sps) + " |")
        print("|---|" + "---:|" * len(sps))
        best = {s: max(mean(cells[(q, s)]) for q in pats if (q, s) in cells) for s in sps}
        for q in pats:
            out = []
            for s in sps:
                v = cells.get((q, s))
                if not v:
                    out.append("")
                    continue
                txt = f"{100 * mean(v):.2f} ± {100 * pstdev(v):.2f}"
                out.append(f"**{txt}**" if mean(v) == best[s] else txt)
            print(f"| {q} | " + " | ".join(out) + " |")
        print()
    _plot(table, Path(args.img) / "pat_ablation.png")
    print("![PAT ablation](img/pat_ablation.png)\n")


def _plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(k[0], k[1], k[2], k[3]) for k in table if k[3] in ("contrib-std", "magnitude")})
    if not panels:
        return
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        cells = table[key]
        for q in sorted({k[0] for k in cells}, key=lambda x: (x != "none", x)):
            sps = sorted(s for (qq, s) in cells if qq == q)
            ax.errorbar([100 * s for s in sps], [100 * mean(cells[(q, s)]) for s in sps],
                        yerr=[100 * pstdev(cells[(q, s)]) for s in sps], marker="o", ms=3, capsize=3, label=q)
        ax.set_title(f"{key[0]}/{key[1]} {key[2]}, {key[3]}", fontsize=9)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
