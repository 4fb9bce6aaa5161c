"""The converged-protocol study (configs/study-converged) as tables, with issue 11's targets checked.

    python benchmarks/converged_report.py [--results docs/data/study_converged.jsonl] [--img docs/img]

Prints markdown: the dense accuracy of each pair against its usual accuracy; one table per (model,
regime, PAT) group (mean +- std over seeds, best in bold); then the targets: how often one of our
methods is best or within the seed spread of the best, one-shot at 95% against the best published
baseline, LeNet-300-100 at 95%+ against its dense accuracy, and the 75%-fewer-weights claim.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

from relprune.experiments.bench import BenchConfig, cells, key_of
from relprune.experiments.recipes import USUAL_ACCURACY
from relprune.experiments.report import load_results, markdown_tables, plot_accuracy

#: The baselines as their authors run them; every other label is one of ours.
PUBLISHED = {"magnitude", "magnitude [layer]", "wanda -live [row]", "ria -live [row]", "snip", "sparsegpt", "random"}


def columns(rows: list[dict]) -> dict[tuple, dict[str, list[float]]]:
    """(model, dataset, regime, pat, alpha, sparsity) -> method -> accuracies over seeds."""
    out: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        col = (r["model"], r["dataset"], r["regime"], r["pat"], r["pat_alpha"], round(r["sparsity"], 6))
        out[col][r["method"]].append(r["accuracy"])
    return out


def mean_ranks(rows: list[dict]) -> list[str]:
    """Per regime, each method's mean rank over the (model, sparsity) columns it ran in (1 = best),
    counting only methods present in every column of that regime: what the defaults follow."""
    lines = []
    by_regime: dict[str, list[dict[str, float]]] = defaultdict(list)
    for (_, _, regime, pat, _, _), methods in sorted(columns(rows).items()):
        if pat == "none":
            by_regime[regime].append({m: mean(v) for m, v in methods.items()})
    for regime, cols in by_regime.items():
        common = set.intersection(*(set(c) for c in cols))
        ranks: dict[str, list[int]] = defaultdict(list)
        for c in cols:
            order = sorted(common, key=lambda m: -c[m])
            for i, m in enumerate(order):
                ranks[m].append(i + 1)
        ordered = sorted(ranks, key=lambda m: mean(ranks[m]))
        lines.append(f"- {regime} ({len(cols)} columns): " + ", ".join(
            f"{m} {mean(ranks[m]):.1f}" for m in ordered))
    return lines


def targets(rows: list[dict]) -> list[str]:
    lines = []
    cols = columns([r for r in rows if r["pat"] == "none"])
    wins = total = 0
    lost = []
    for col, methods in sorted(cols.items()):
        if len(methods) < 2 or min(len(v) for v in methods.values()) < 2:
            continue  # a column needs every method on two seeds or more
        means = {m: mean(v) for m, v in methods.items()}
        best = max(means, key=means.get)
        spread = pstdev(methods[best])
        ours = max((m for m in means if m not in PUBLISHED), key=means.get, default=None)
        if ours is None:
            continue
        total += 1
        if means[ours] >= means[best] - max(spread, pstdev(methods[ours])):
            wins += 1
        else:
            lost.append(f"{col[0]}/{col[1]} {col[2]} {100 * col[5]:g}%: best {best} {100 * means[best]:.2f}, "
                        f"ours {ours} {100 * means[ours]:.2f}")
    lines.append(f"- Ours best or within the seed spread of the best: **{wins} of {total} columns** "
                 f"({100 * wins / max(total, 1):.0f}%; target 80%).")
    lines.extend(f"  - lost: {x}" for x in lost)
    for (model, dataset, regime, _, _, s), methods in sorted(cols.items()):
        if regime != "oneshot" or s != 0.95:
            continue
        means = {m: mean(v) for m, v in methods.items()}
        pub = max((m for m in means if m in PUBLISHED), key=means.get, default=None)
        ours = max((m for m in means if m not in PUBLISHED), key=means.get, default=None)
        if pub and ours:
            lines.append(f"- One-shot 95%, {model}/{dataset}: ours {ours} {100 * means[ours]:.2f} vs published "
                         f"{pub} {100 * means[pub]:.2f} ({100 * (means[ours] - means[pub]):+.2f} points; target +10 "
                         "on two pairs).")
    dense = {(r["model"], r["dataset"], r["seed"]): r["dense_accuracy"] for r in rows if r["pat"] == "none"}
    reached = []
    for (model, dataset, regime, _, _, s), methods in sorted(cols.items()):
        d = [v for (m, ds, _), v in dense.items() if (m, ds) == (model, dataset)]
        if not d or model not in ("lenet300", "lenet5") or dataset != "mnist" or s < 0.75:
            continue
        above = [m for m, v in methods.items() if mean(v) >= mean(d)]
        best = max(methods, key=lambda m: mean(methods[m]))
        reached.append(f"{model}/{dataset} {regime} {100 * s:g}%: best {best} {100 * mean(methods[best]):.2f} "
                       f"vs dense {100 * mean(d):.2f}" + (f" (at or above: {', '.join(above)})" if above else ""))
    lines.append("- Pruned MNIST networks against their converged dense accuracy (the 75%-fewer-weights claim "
                 "and LeNet-300-100 at 95%+):")
    lines.extend(f"  - {x}" for x in reached)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="docs/data/study_converged.jsonl")
    p.add_argument("--configs", default="configs/study-converged")
    p.add_argument("--img", default="docs/img")
    args = p.parse_args()
    configs = [BenchConfig.from_file(path) for path in sorted(Path(args.configs).glob("*.toml"))]
    planned = {key_of(c) for cfg in configs for c in cells(cfg)}
    rows = [r for r in load_results(args.results) if r["key"] in planned]
    print(f"{len(rows)} of {len(planned)} planned cells finished.\n")
    print("| model | dataset | dense test accuracy % (seeds) | usual |")
    print("|---|---|---:|---:|")
    dense = defaultdict(dict)
    for r in rows:
        if r["pat"] == "none":
            dense[(r["model"], r["dataset"])][r["seed"]] = r["dense_accuracy"]
    for (model, dataset), per_seed in sorted(dense.items()):
        v = list(per_seed.values())
        print(f"| {model} | {dataset} | {100 * mean(v):.2f} ± {100 * pstdev(v):.2f} ({len(v)}) | "
              f"{100 * USUAL_ACCURACY.get((model, dataset), float('nan')):.1f} |")
    print()
    print(markdown_tables(rows))
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    png = plot_accuracy(rows, img / "study_converged.png")
    print(f"![study]({Path('img') / png.name})\n")
    print("\n".join(targets(rows)))
    print("\nMean rank per regime (lower is better):\n")
    print("\n".join(mean_ranks(rows)))


if __name__ == "__main__":
    main()
