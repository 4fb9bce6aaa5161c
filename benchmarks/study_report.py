"""Tables and plots of docs/results.md from the study's results file, one section per config.

    python benchmarks/study_report.py [--results runs/study/results.jsonl] [--img docs/img]

Prints markdown: for each configs/study/*.toml, the rows of that config only (mean ± std over
seeds, best per column in bold), the number of cells and seeds, and writes one plot per config.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

from relprune.experiments.bench import BenchConfig, cells, key_of
from relprune.experiments.report import load_results, markdown_tables, plot_accuracy

HEADLINE = ["rc", "rc -live", "contrib-std", "contrib-std -live", "contrib-share", "contrib-share -live",
            "magnitude", "wanda", "ria", "snip", "random"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="runs/study/results.jsonl")
    p.add_argument("--configs", default="configs/study")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--summary", action="store_true",
                   help="only the global-scope headline methods, every config's rows merged per model and regime")
    args = p.parse_args()
    configs = [(path, BenchConfig.from_file(path)) for path in sorted(Path(args.configs).glob("*.toml"))]
    planned = {key_of(c) for _, cfg in configs for c in cells(cfg)}
    # Cells of grid versions trimmed away later are kept in the file but left out of every table.
    rows = [r for r in load_results(args.results) if r["key"] in planned]
    by_key = {r["key"]: r for r in rows}
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    if args.summary:
        headline = [r for r in rows if r["method"] in HEADLINE and r["calib_samples"] == 1024]
        print(markdown_tables(headline))
        png = plot_accuracy(headline, img / "summary.png")
        print(f"![summary]({Path('img') / png.name})\n")
        return
    for cfg_path, cfg in configs:
        keys = [key_of(c) for c in cells(cfg)]
        mine = [by_key[k] for k in keys if k in by_key]
        print(f"## {cfg_path.stem}\n")
        print(f"`relprune bench --config {cfg_path} --out runs/study` - {len(mine)} of {len(keys)} cells "
              f"finished, seeds {cfg.seeds}.\n")
        if not mine:
            continue
        print(markdown_tables(mine))
        png = plot_accuracy(mine, img / f"{cfg_path.stem}.png")
        print(f"![{cfg_path.stem}]({Path('img') / png.name})\n")
    # Overall: the six criteria run in every one-shot and fine-tune config (global scope, liveness on,
    # 1,024 calibration samples), ranked within each (model, regime, sparsity) column that has all six.
    contenders = ["rc", "contrib-std", "contrib-share", "magnitude", "wanda", "ria"]
    cols = defaultdict(dict)
    for r in rows:
        if r["calib_samples"] == 1024 and r["method"] in contenders and r["regime"] != "iterative":
            cols[(r["model"], r["dataset"], r["regime"], r["sparsity"])].setdefault(r["method"], []).append(
                r["accuracy"])
    ranks = defaultdict(list)
    wins = defaultdict(int)
    used = [c for c in cols.values() if len(c) == len(contenders)]
    for col in used:
        order = sorted(col, key=lambda m: -mean(col[m]))
        wins[order[0]] += 1
        for i, m in enumerate(order):
            ranks[m].append(i / (len(order) - 1))
    print(f"## Overall: {len(contenders)} criteria over the {len(used)} (model, regime, sparsity) columns "
          "where all ran\n")
    print("| method | mean normalised rank (0 = always best) | columns won |\n|---|---:|---:|")
    for m, rs in sorted(ranks.items(), key=lambda kv: mean(kv[1])):
        print(f"| {m} | {mean(rs):.3f} | {wins[m]} |")
    print()
    print_regime_split(rows, contenders)
    print_calibration(rows)
    print_iterative(rows)
    print_accuracy_at(rows, 0.9)
    print(json.dumps({"rows": len(rows)}))


def _mean_acc(rows: list[dict], **match) -> list[float]:
    return [r["accuracy"] for r in rows if all(r.get(k) == v for k, v in match.items())]


def print_regime_split(rows: list[dict], contenders: list[str]) -> None:
    """Mean normalised rank and mean gap to the column's best, per regime and sparsity range."""
    print("## Ranks by regime (mean normalised rank / mean points behind the column's best)\n")
    print("| regime, sparsities | " + " | ".join(f"{i + 1}." for i in range(len(contenders))) + " |")
    print("|---|" + "---|" * len(contenders))
    for lo in (0.5, 0.9):
        for regime in ("oneshot", "finetune"):
            cols = defaultdict(dict)
            for r in rows:
                if (r["calib_samples"] == 1024 and r["method"] in contenders and r["regime"] == regime
                        and r["sparsity"] >= lo):
                    cols[(r["model"], r["dataset"], r["sparsity"])].setdefault(r["method"], []).append(
                        r["accuracy"])
            used = [c for c in cols.values() if len(c) == len(contenders)]
            ranks, gaps = defaultdict(list), defaultdict(list)
            for col in used:
                order = sorted(col, key=lambda m: -mean(col[m]))
                best = mean(col[order[0]])
                for i, m in enumerate(order):
                    ranks[m].append(i / (len(order) - 1))
                    gaps[m].append(best - mean(col[m]))
            cells = [f"{m} {mean(ranks[m]):.2f} / {100 * mean(gaps[m]):.1f}"
                     for m in sorted(ranks, key=lambda m: mean(ranks[m]))]
            print(f"| {regime}, {100 * lo:g}-98% ({len(used)} columns) | " + " | ".join(cells) + " |")
    print()


def print_calibration(rows: list[dict]) -> None:
    print("## Calibration set size (one-shot, liveness on; mean ± std over seeds)\n")
    sizes = sorted({r["calib_samples"] for r in rows})
    print("| model | criterion | sparsity | " + " | ".join(f"{n} images" for n in sizes) + " |")
    print("|---|---|---:|" + "---:|" * len(sizes))
    keys = sorted({(r["model"], r["dataset"], r["method"]) for r in rows if r["calib_samples"] == 128})
    for model, dataset, method in keys:
        for sp in (0.9, 0.95):
            cells = []
            for n in sizes:
                v = _mean_acc(rows, model=model, dataset=dataset, method=method, sparsity=sp, calib_samples=n,
                              regime="oneshot")
                cells.append(f"{100 * mean(v):.2f} ± {100 * pstdev(v):.2f}" if v else "")
            print(f"| {model}/{dataset} | {method} | {100 * sp:g}% | " + " | ".join(cells) + " |")
    print()


def print_iterative(rows: list[dict]) -> None:
    print("## Iterative (3 rounds) vs one-shot + the same fine-tune once (mean ± std over seeds)\n")
    keys = sorted({(r["model"], r["dataset"], r["method"]) for r in rows if r["regime"] == "iterative"})
    print("| model | criterion | sparsity | one-shot | one-shot + fine-tune | iterative |\n"
          "|---|---|---:|---:|---:|---:|")
    for model, dataset, method in keys:
        for sp in sorted({r["sparsity"] for r in rows if r["regime"] == "iterative"}):
            cells = []
            for regime in ("oneshot", "finetune", "iterative"):
                v = _mean_acc(rows, model=model, dataset=dataset, method=method, sparsity=sp, regime=regime,
                              calib_samples=1024)
                cells.append(f"{100 * mean(v):.2f} ± {100 * pstdev(v):.2f}" if v else "")
            print(f"| {model}/{dataset} | {method} | {100 * sp:g}% | " + " | ".join(cells) + " |")
    print()


def print_accuracy_at(rows: list[dict], sparsity: float) -> None:
    print(f"## One-shot accuracy at {100 * sparsity:g}% per criterion, mean over seeds (global, liveness on)\n")
    models = sorted({(r["model"], r["dataset"]) for r in rows})
    crits = sorted({r["method"] for r in rows if " " not in r["method"]})
    print("| criterion | " + " | ".join(f"{m}/{d}" for m, d in models) + " |")
    print("|---|" + "---:|" * len(models))
    for c in crits:
        cells = []
        for m, d in models:
            v = _mean_acc(rows, model=m, dataset=d, method=c, sparsity=sparsity, regime="oneshot",
                          calib_samples=1024)
            cells.append(f"{100 * mean(v):.1f}" if v else "")
        print(f"| {c} | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    main()
