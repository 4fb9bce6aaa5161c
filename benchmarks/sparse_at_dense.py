"""Can a pruned network match its converged dense model? (issue 11's LeNet-300-100 target)

Starts from the study's converged dense model (trained and cached like ``relprune bench`` does)
and spends a second training budget equal to the dense one: gradual pruning (Zhu & Gupta's cubic
schedule) spread over ``--passes`` passes of the training data, then training on at the final
sparsity with the dense recipe's optimiser, cosine schedule and augmentation for the rest of the
budget. Prints one line per (method, sparsity, seed) and appends it to ``--out``/sparse_at_dense.jsonl.

    python benchmarks/sparse_at_dense.py --methods "magnitude,rc-flow,contrib-share" --sparsities 0.95
    python benchmarks/sparse_at_dense.py --table      # the results so far, as markdown

Sparsity 0 is the control: the same second budget spent on the dense model.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from statistics import mean, pstdev

import torch

from relprune.core.masks import current_masks
from relprune.experiments.bench import BenchConfig, dense_model
from relprune.experiments.data import load_dataset
from relprune.experiments.experiment import Method, fresh_copy, gradual_prune
from relprune.experiments.recipes import converged_recipe
from relprune.experiments.report import load_results
from relprune.experiments.training import calibration_batches, evaluate, train


def table(path: Path) -> str:
    """Markdown: test accuracy per (method, sparsity), mean +- std over seeds, against the dense models."""
    rows = load_results(path)
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        label = r["method"] if r["sparsity"] else "dense (control)"
        groups[(f"{label}, lr {r['recipe']['lr']:g}", r["sparsity"])].append(r)

    def pm(values: list[float]) -> str:
        return f"{100 * mean(values):.2f} ± {100 * pstdev(values):.2f}"

    lines = ["| method, second-budget lr | sparsity | seeds | after the gradual passes % | at the end % "
             "| its dense models % |",
             "|---|---:|---|---:|---:|---:|"]
    for (method, sparsity), g in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        g.sort(key=lambda r: r["seed"])
        lines.append(f"| {method} | {100 * sparsity:g}% | {','.join(str(r['seed']) for r in g)} | "
                     f"{pm([r['accuracy_after_gradual'] for r in g])} | {pm([r['accuracy'] for r in g])} | "
                     f"{pm([r['dense_accuracy'] for r in g])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lenet300")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--methods", default="magnitude,rc-flow,contrib-share", help="comma-separated method labels")
    ap.add_argument("--sparsities", default="0.95")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--passes", type=int, default=10, help="passes of the data the gradual schedule spans")
    ap.add_argument("--steps", type=int, default=50, help="pruning steps of the cubic schedule")
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate of the second budget (default: the dense recipe's)")
    ap.add_argument("--calib-samples", type=int, default=1024)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--dense-dir", default="runs/study-converged",
                    help="bench output folder whose dense/ models are reused (trained there if missing)")
    ap.add_argument("--out", default="runs/sparse_at_dense")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--table", action="store_true", help="print the results in --out as markdown and stop")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.out) / "sparse_at_dense.jsonl"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig(dense_recipe="converged", data_dir=args.data_dir)
    for seed in (int(s) for s in args.seeds.split(",")):
        data = load_dataset(args.dataset, args.data_dir, seed=seed)
        dense, dense_acc = dense_model(cfg, Path(args.dense_dir), args.model, args.dataset, data, seed, "none", 0.0)
        recipe = converged_recipe(args.model, args.dataset, seed=seed)
        if args.lr is not None:
            recipe = replace(recipe, lr=args.lr)
        rest = recipe.epochs - args.passes
        if rest < 1:
            raise SystemExit(f"--passes must be below the dense recipe's {recipe.epochs} epochs")
        calib = calibration_batches(data.train, args.calib_samples, seed=seed)
        for label in args.methods.split(","):
            method = Method.parse(label.strip())
            for sparsity in (float(s) for s in args.sparsities.split(",")):
                t0 = time.perf_counter()
                model = fresh_copy(dense)
                gradual_prune(model, data, calib, method, sparsity, args.steps, recipe, passes=args.passes)
                after_gradual = evaluate(model, data.test)
                train(model, data, replace(recipe, epochs=rest), desc=f"train on {method.label} {sparsity:g}")
                acc = evaluate(model, data.test)
                row = {"model": args.model, "dataset": args.dataset, "method": method.label, "seed": seed,
                       "sparsity": sparsity, "achieved_sparsity": current_masks(model).sparsity,
                       "accuracy": acc, "accuracy_after_gradual": after_gradual, "dense_accuracy": dense_acc,
                       "passes": args.passes, "steps": args.steps, "train_epochs_after": rest,
                       "recipe": {k: v for k, v in asdict(recipe).items() if k != "seed"},
                       "seconds": time.perf_counter() - t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                with open(out / "sparse_at_dense.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{args.model}/{args.dataset} s{seed} {method.label:22} {sparsity:.2f}: "
                      f"{acc * 100:.2f}% (after the gradual passes {after_gradual * 100:.2f}%; "
                      f"dense {dense_acc * 100:.2f}%)", flush=True)


if __name__ == "__main__":
    main()
