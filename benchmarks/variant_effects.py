"""Paired effect of one option (bias compensation, or liveness) on one-shot accuracy.

For every (model, criterion, sparsity, seed) where the study ran a method with and without the
option (global scope, 1,024 calibration samples), the accuracy difference; printed as mean ± std
over seeds per model and sparsity, and the mean over criteria.

    python benchmarks/variant_effects.py --option bias_compensation
    python benchmarks/variant_effects.py --option liveness
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from statistics import mean, pstdev

from relprune.experiments.report import load_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="runs/study/results.jsonl")
    p.add_argument("--option", choices=["bias_compensation", "liveness"], required=True)
    args = p.parse_args()
    field = f"m_{args.option}"
    cells: dict[tuple, dict[bool, float]] = defaultdict(dict)
    for r in load_results(args.results):
        if r["regime"] != "oneshot" or r["calib_samples"] != 1024 or r["m_scope"] != "global" or r["m_n_m"]:
            continue
        other = "m_liveness" if args.option == "bias_compensation" else "m_bias_compensation"
        key = (r["model"], r["dataset"], r["m_criterion"], r[other], r["sparsity"], r["seed"])
        cells[key][r[field]] = r["accuracy"]
    diffs: dict[tuple, list[float]] = defaultdict(list)
    for (model, dataset, crit, _, sparsity, _seed), pair in cells.items():
        if True in pair and False in pair:
            diffs[(f"{model}/{dataset}", crit, sparsity)].append(pair[True] - pair[False])
    models = sorted({k[0] for k in diffs})
    crits = sorted({k[1] for k in diffs})
    sps = sorted({k[2] for k in diffs})
    print(f"Accuracy with minus without {args.option} (points; mean over seeds and the other option)\n")
    for model in models:
        print(f"#### {model}\n")
        print("| criterion | " + " | ".join(f"{100 * s:g}%" for s in sps) + " |")
        print("|---|" + "---:|" * len(sps))
        for c in [*crits, "mean over criteria"]:
            row = []
            for s in sps:
                if c == "mean over criteria":
                    vals = [mean(diffs[(model, cc, s)]) for cc in crits if (model, cc, s) in diffs]
                    row.append(f"{100 * mean(vals):+.2f}" if vals else "")
                else:
                    v = diffs.get((model, c, s))
                    row.append(f"{100 * mean(v):+.2f} ± {100 * pstdev(v):.2f}" if v else "")
            print(f"| {c} | " + " | ".join(row) + " |")
        print()


if __name__ == "__main__":
    main()
