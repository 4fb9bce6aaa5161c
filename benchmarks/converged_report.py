"""The converged-protocol study (configs/study-converged) as tables, with issue 11's targets checked.

    python benchmarks/converged_report.py [--results docs/data/study_converged.jsonl] [--img docs/img]

Prints markdown: the dense accuracy of each pair against its usual accuracy; one table per (model,
regime, PAT) group (mean +- std over seeds, best in bold); then the targets: how often one of our
methods is best or within the seed spread of the best, one-shot at 95% against the best published
baseline, LeNet-300-100 at 95%+ against its dense accuracy, and the 75%-fewer-weights claim;
per regime, the methods by mean rank and by mean distance to each column's best (what the defaults
follow); the paired effects of our one-shot switches (-live, +bc, [layer]).
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


def _column(r: dict) -> tuple:
    return r["model"], r["dataset"], r["regime"], r["pat"], r["pat_alpha"], round(r["sparsity"], 6)


def comparable(rows: list[dict]) -> list[dict]:
    """The rows a fair comparison keeps: in each (model, dataset, regime, pat, alpha, sparsity)
    column, every method on the same seeds - the seed set that keeps the most (method, seed)
    results (ties: more seeds). A method that has not run on all of them is left out of that
    column, and its results on other seeds are set aside, while a sweep is under way."""
    by_col: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by_col[_column(r)][r["method"]][r["seed"]] = r
    kept = []
    for methods in by_col.values():
        candidates = {frozenset(v) for v in methods.values()}
        candidates |= {a & b for a in candidates for b in candidates if a & b}

        def ran(seeds: frozenset[int], methods: dict[str, dict[int, dict]] = methods) -> list[str]:
            return [m for m, v in methods.items() if seeds <= set(v)]

        seeds = max(sorted(candidates, key=sorted), key=lambda c: (len(ran(c)) * len(c), len(c)))
        kept += [methods[m][k] for m in ran(seeds) for k in sorted(seeds)]
    return kept


def columns(rows: list[dict]) -> dict[tuple, dict[str, list[float]]]:
    """Column -> method -> accuracies over the column's seeds (of :func:`comparable` rows)."""
    out: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in comparable(rows):
        out[_column(r)][r["method"]].append(r["accuracy"])
    return out


def mean_ranks(rows: list[dict]) -> list[str]:
    """Per regime, two orderings of the methods (what the defaults follow): the mean rank (1 =
    best) among the methods every counted column ran, over the columns that ran every method
    their (model, dataset) ran in that regime; and each method's mean distance in points to the
    column's best over all the columns it ran in."""
    lines = []
    by_regime: dict[str, list[tuple[tuple, dict[str, float]]]] = defaultdict(list)
    for col, methods in sorted(columns(rows).items()):
        if col[3] == "none":
            by_regime[col[2]].append((col, {m: mean(v) for m, v in methods.items()}))
    for regime, cols in by_regime.items():
        ran: dict[tuple, set[str]] = defaultdict(set)
        for col, c in cols:
            ran[col[:2]] |= set(c)
        complete = [c for col, c in cols if set(c) == ran[col[:2]]]
        common = set.intersection(*(set(c) for c in complete)) if complete else set()
        ranks: dict[str, list[int]] = defaultdict(list)
        for c in complete:
            # Sorted by name first so that ties rank the same in every run (sets have no fixed order).
            for i, m in enumerate(sorted(sorted(common), key=lambda m: -c[m])):
                ranks[m].append(i + 1)
        ordered = sorted(ranks, key=lambda m: mean(ranks[m]))
        lines.append(f"- {regime}, mean rank among the {len(common)} methods of all {len(complete)} complete "
                     "columns: " + ", ".join(f"{m} {mean(ranks[m]):.1f}" for m in ordered))
        gaps: dict[str, list[float]] = defaultdict(list)
        for _, c in cols:
            best = max(c.values())
            for m, v in c.items():
                gaps[m].append(100 * (best - v))
        ordered = sorted(gaps, key=lambda m: mean(gaps[m]))
        lines.append(f"- {regime}, mean points behind the column's best (columns run): " + ", ".join(
            f"{m} {mean(gaps[m]):.2f} ({len(gaps[m])})" for m in ordered))
    return lines


def targets(rows: list[dict]) -> list[str]:
    lines = []
    cols = columns([r for r in rows if r["pat"] == "none"])
    wins = total = single_wins = single_total = 0
    lost = []
    for col, methods in sorted(cols.items()):
        if len(methods) < 2:
            continue
        means = {m: mean(v) for m, v in methods.items()}
        best = max(means, key=means.get)
        ours = max((m for m in means if m not in PUBLISHED), key=means.get, default=None)
        if ours is None:
            continue
        where = f"{col[0]}/{col[1]} {col[2]} {100 * col[5]:g}%"
        if len(methods[best]) < 2:
            # One seed: no spread to be within, so only being best counts.
            single_total += 1
            single_wins += ours == best
            if ours != best:
                lost.append(f"{where} (one seed): best {best} {100 * means[best]:.2f}, ours {ours} "
                            f"{100 * means[ours]:.2f}")
            continue
        total += 1
        if means[ours] >= means[best] - max(pstdev(methods[best]), pstdev(methods[ours])):
            wins += 1
        else:
            lost.append(f"{where}: best {best} {100 * means[best]:.2f}, ours {ours} {100 * means[ours]:.2f}")
    lines.append(f"- Ours best or within the seed spread of the best: **{wins} of {total} columns** with two or "
                 f"more seeds ({100 * wins / max(total, 1):.0f}%; target 80%); ours best in {single_wins} of "
                 f"{single_total} one-seed columns.")
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


#: One-shot switches of ours measured by config 5: (label suffix, what it changes).
VARIANTS = {" -live": "statistics over all samples instead of live ones (liveness off)",
            " +bc": "bias compensation on", " [layer]": "each layer at the target instead of one global budget"}


def variant_effects(rows: list[dict]) -> list[str]:
    """Per switch, the paired difference (variant minus the same method without it; same model, seed and
    sparsity; one-shot, no PAT) in accuracy points, averaged over the criteria that ran both."""
    acc = {(r["model"], r["dataset"], r["method"], r["seed"], round(r["sparsity"], 6)): r["accuracy"]
           for r in rows if r["regime"] == "oneshot" and r["pat"] == "none"}
    lines = []
    for suffix, what in VARIANTS.items():
        diffs: dict[tuple[str, float], list[float]] = defaultdict(list)
        bases: set[str] = set()
        for (model, dataset, method, seed, s), a in acc.items():
            if not method.endswith(suffix):
                continue
            base = acc.get((model, dataset, method[: -len(suffix)], seed, s))
            if base is not None:
                diffs[(f"{model}/{dataset}", s)].append(100 * (a - base))
                bases.add(method[: -len(suffix)])
        if not diffs:
            continue
        sparsities = sorted({s for _, s in diffs})
        lines += [f"**{suffix.strip()}**: {what}; mean paired difference in points over {', '.join(sorted(bases))}",
                  "", "| model | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |",
                  "|---|" + "---:|" * len(sparsities)]
        for pair in sorted({p for p, _ in diffs}):
            lines.append(f"| {pair} | " + " | ".join(
                f"{mean(diffs[(pair, s)]):+.2f}" if diffs.get((pair, s)) else "" for s in sparsities) + " |")
        lines.append("")
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
    print(markdown_tables(comparable(rows)))
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    png = plot_accuracy(rows, img / "study_converged.png")
    print(f"![study]({Path('img') / png.name})\n")
    print("\n".join(targets(rows)))
    print("\nThe methods per regime (lower is better):\n")
    print("\n".join(mean_ranks(rows)))
    print("\nOne-shot switches (config 5; magnitude [layer] from config 1):\n")
    print("\n".join(variant_effects(rows)))


if __name__ == "__main__":
    main()
