"""Perplexity of SmolLM2-135M pruned by each recipe, one cell per fresh process (so peak RSS is its own).

    python benchmarks/llm_bench.py --out docs/data/llm_results.jsonl [--plan headline] [--calibration-samples 16]

Each cell: load the model (float32), draw calibration windows from ../shared/data/shakespeare/calib.txt
(seeded), prune every decoder Linear block by block with ``relprune.llm.prune_sequential``, then
perplexity on the first ``--eval-samples`` non-overlapping windows of eval.txt and, with
``--second-domain botchan`` (the ``frontier`` plan's protocol), of a text of another domain
(``relprune.llm.known_text``: 20th-century English prose). One JSON line per finished cell; cells
already in --out are skipped, so the run resumes. ``--table`` prints the markdown table of a
results file (``--column perplexity_botchan`` for the second domain).

``alps-reference`` is ALPS as its authors run it (``benchmarks/alps_port.py``, a port of their code);
the variant ``zero-anchor`` runs the exact re-fit with its damping pulling toward zero (the re-fit
before 2026-12-01) instead of toward the dense weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "shakespeare"

# (criterion, reconstruct): the baselines as published, then ours with and without the re-fit.
RECIPES = [
    ("magnitude", None), ("wanda", None), ("ria", None), ("sparsegpt", None),
    ("contrib-share", None), ("contrib-std", None),
    ("wanda", "exact"), ("contrib-share", "exact"), ("contrib-std", "exact"), ("wanda", "obs"),
    ("obs", None), ("obs", "exact"), ("sparsegpt", "exact"),
]
# The recipes whose seed spread decides the headline comparison.
KEY = [("wanda", None), ("sparsegpt", None), ("contrib-share", "exact"), ("wanda", "exact"), ("obs", "exact"),
       ("sparsegpt", "exact")]
BUDGETS = {"50%": {"sparsity": 0.5}, "60%": {"sparsity": 0.6}, "70%": {"sparsity": 0.7}, "80%": {"sparsity": 0.8},
           "2:4": {"n_m": "2:4"}, "4:8": {"n_m": "4:8"}}
# Variants of a recipe: "bc" bias compensation (bias-free projections get a bias), "owl" OWL's
# outlier-weighted per-block sparsities (Yin et al. 2024, M=5, lambda=0.08 as published).
VARIANTS = {"": {}, "bc": {"bias_compensation": True}, "owl": {"allocation": "owl"},
            "owl+bc": {"allocation": "owl", "bias_compensation": True}, "zero-anchor": {},
            "refine": {"refine": True}, "entropy": {"allocation": "entropy"},
            "errors": {"allocation": "errors"}, "errors-0.2": {"allocation": "errors", "owl_lambda": 0.2},
            "search": {"allocation": "search"}}
# Issue 22's frontier: the baselines as published, the peer (ALPS), our joint solvers, our best
# criterion-then-re-fit recipe under both re-fit anchors.
FRONTIER = [("wanda", None, ""), ("sparsegpt", None, ""), ("obs", "exact", ""), ("admm", None, ""),
            ("alps-reference", None, ""), ("gradual", None, ""), ("obs", "exact", "zero-anchor")]
PLANS = {
    # The cells that decide the default, first; then the rest of the grid.
    "headline": [("dense", None, None)] + [(c, r, b) for b in ("50%", "2:4") for c, r in RECIPES],
    "spread": [(c, r, b) for b in ("50%", "2:4") for c, r in KEY],
    # The headline rows a refactor must reproduce (issue 20), seed 0.
    "check": [(c, r, b) for b in ("50%", "2:4") for c, r in [("obs", "exact"), ("sparsegpt", None), ("wanda", None),
                                                              ("sparsegpt", "exact")]],
    # The headline rows of today's tables a refactor must reproduce (issue 31), seed 0.
    "check-frontier": [(c, r, b, v) for b in ("50%", "2:4") for c, r, v in FRONTIER[:4]],
    # Issue 32: the layer-error allocation against uniform, run the same day (the frontier rows hold OWL and
    # entropy).
    "allocation-errors": [("admm", None, b, v) for b in ("70%", "60%") for v in ("errors", "errors-0.2", "")],
    # Issue 32: the search allocation (from the layer errors, scored by KL to the dense model) against its start
    # and uniform, run the same day; with --model gemma3-270m for the second family.
    "allocation-search": [("admm", None, "70%", v) for v in ("search", "errors", "")],
    "allocation-search-levels": [("admm", None, b, v) for b in ("60%", "80%") for v in ("search", "errors", "")],
    # Issue 32's allocation table: uniform, OWL, the contribution entropy and the search at 60/70/80%, one build,
    # one day (with --model gemma3-270m; 70%'s uniform and search last, as "allocation-search" holds them);
    # "allocation-table-rest" adds OWL, the entropy and the 80% errors row to the SmolLM2 rows of
    # "allocation-search" and "allocation-search-levels".
    "allocation-table": [("admm", None, b, v) for b, v in
                         [("60%", ""), ("60%", "owl"), ("60%", "entropy"), ("60%", "search"), ("70%", "owl"),
                          ("70%", "entropy"), ("80%", ""), ("80%", "owl"), ("80%", "entropy"), ("80%", "search"),
                          ("70%", ""), ("70%", "search")]],
    "allocation-table-rest": [("admm", None, b, v) for b in ("70%", "60%", "80%") for v in ("owl", "entropy")]
    + [("admm", None, "80%", "errors")],
    # Issue 32: the default's rows after a change of its solver's speed (compare with the frontier rows, seed 0).
    "check-default": [("admm", None, b, "") for b in ("50%", "2:4")],
    "grid": [(c, r, b) for b in ("60%", "70%", "4:8") for c, r in [("magnitude", None), ("ria", None), *KEY]],
    # Levers of issue 10: bias compensation for the mask-only criteria, OWL for every kind of recipe.
    "levers": [(c, None, b, "bc") for b in ("50%", "2:4", "60%", "70%") for c in ("contrib-share", "wanda")]
    + [(c, r, b, v) for b in ("50%", "60%", "70%") for c, r, v in
       [("wanda", None, "owl"), ("sparsegpt", None, "owl"), ("obs", "exact", "owl"), ("sparsegpt", "exact", "owl"),
        ("contrib-share", None, "owl+bc")]],
    "frontier": [("dense", None, None)] + [(c, r, b, v) for b in ("50%", "2:4", "70%", "60%") for c, r, v in FRONTIER],
    "frontier-key": [(c, r, b, v) for b in ("50%", "2:4", "70%", "60%") for c, r, v in FRONTIER[:4]],
    # The second family (Gemma 3 270M): the baselines, our default before and after, the joint solver.
    "frontier-family": [("dense", None, None)] + [(c, r, "50%", v) for c, r, v in [*FRONTIER[:4], FRONTIER[6]]]
    + [(c, r, "2:4", v) for c, r, v in FRONTIER[:4]],
    # The mask-only contribution recipe (Wanda's mask refined by the contributions' second moments), then 70%.
    "frontier-70": [("wanda", None, b, "refine") for b in ("50%", "2:4")]
    + [(c, r, "70%", v) for c, r, v in FRONTIER[:5]],
    # What the first frontier runs left out: the 60% column, Gemma 3 at 70% (with --model gemma3-270m),
    # the calibration-seed spread of the headline pair, per-block sparsities at 70%.
    "frontier-60": [(c, r, "60%", v) for c, r, v in FRONTIER[:4]],
    "frontier-family-70": [(c, r, "70%", v) for c, r, v in FRONTIER[:4]],
    "frontier-seeds": [(c, None, b, "") for b in ("50%", "2:4") for c in ("sparsegpt", "admm")],
    "frontier-allocation": [("admm", None, "70%", v) for v in ("entropy", "owl")],
    "frontier-mask-only": [("wanda", None, b, "refine") for b in ("60%", "70%")],
    # Prune time of the default beside SparseGPT's, in one run (the 3 x target).
    "frontier-time": [(c, None, "50%", "") for c in ("sparsegpt", "admm")],
    # The levers of the contribution statistics: refinement of a mask-only criterion and before the re-fit,
    # per-block sparsities from the contribution entropy against OWL's.
    "frontier-levers": [(c, r, b, v) for b in ("50%", "2:4", "70%") for c, r, v in
                        [("wanda", None, "refine"), ("obs", "exact", "refine")]]
    + [(c, r, b, v) for b in ("70%", "50%") for c, r, v in [("admm", None, "entropy"), ("admm", None, "owl"),
                                                             ("wanda", None, "entropy"), ("wanda", None, "owl")]],
}


def cell_key(c: dict) -> tuple:
    return (c.get("model", "smollm2-135m"), c["criterion"], c["reconstruct"], c.get("variant", ""), c["budget"],
            c["seed"], c["calibration_samples"], c["seqlen"], c["eval_samples"], c["sequential"],
            c.get("second_domain"))


def run_cell(cell: dict) -> dict:
    """One cell in this process (called in a fresh child by the driver)."""
    import torch

    import relprune
    from relprune.llm import (
        calibration_windows,
        evaluation_windows,
        load_model,
        perplexity,
        prune_sequential,
        tokenize_file,
    )
    from relprune.llm.text import batches_of

    if cell["criterion"] == "alps-reference":
        sys.path.insert(0, str(Path(__file__).parent))
        from alps_port import register

        register()
    if cell.get("variant") == "zero-anchor":
        import relprune.core.reconstruct as reconstruct

        reconstruct.refit.__kwdefaults__ = {**reconstruct.refit.__kwdefaults__, "anchor": "zero"}
    torch.manual_seed(0)
    model, tokenizer = load_model(cell["model"], fetch=False, quiet=True)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    windows = evaluation_windows(tokenize_file(tokenizer, DATA / "eval.txt"), cell["seqlen"], cell["eval_samples"])
    second = None
    if cell.get("second_domain"):
        from relprune.llm import known_text

        second = evaluation_windows(tokenize_file(tokenizer, known_text(cell["second_domain"], fetch=False)),
                                    cell["seqlen"], cell["eval_samples"])
    seconds = 0.0
    sparsity = 0.0
    searched: list[str] = []  # the search allocation's account of itself (relprune.llm.search logs it)
    handler = logging.Handler()
    handler.emit = lambda record: searched.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("relprune.llm.search").addHandler(handler)
    logging.getLogger("relprune.llm.search").setLevel(logging.INFO)
    if cell["criterion"] != "dense":
        calib = calibration_windows(tokenize_file(tokenizer, DATA / "calib.txt"), cell["calibration_samples"],
                                    cell["seqlen"], cell["seed"])
        start = time.perf_counter()
        masks = prune_sequential(model, batches_of(calib, 8), criterion=cell["criterion"],
                                 reconstruct=cell["reconstruct"] or False, sequential=cell["sequential"],
                                 **BUDGETS[cell["budget"]], **VARIANTS[cell.get("variant", "")])
        seconds = time.perf_counter() - start
        sparsity = masks.sparsity
        relprune.make_permanent(model)
    ppl = perplexity(model, windows, batch_size=1)
    extra: dict = {"search": searched[-1]} if searched else {}
    if second is not None:
        extra[f"perplexity_{cell['second_domain']}"] = perplexity(model, second, batch_size=1).value
    return {**cell, **extra, "perplexity": ppl.value, "eval_windows": ppl.windows, "eval_tokens": ppl.tokens,
            "achieved_sparsity": sparsity, "prune_seconds": round(seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "model_mb": round(model_mb), "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}


def drive(args: argparse.Namespace) -> None:
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {cell_key(json.loads(line)) for line in out.read_text().splitlines() if line.strip()}
    plan = [cell for name in args.plan for cell in PLANS[name]]
    for seed in args.seeds:
        for criterion, reconstruct, budget, *variant in plan:
            cell = {"model": args.model, "criterion": criterion, "reconstruct": reconstruct,
                    "variant": variant[0] if variant else "", "budget": budget or "dense", "seed": seed,
                    "calibration_samples": args.calibration_samples,
                    "seqlen": args.seqlen, "eval_samples": args.eval_samples, "sequential": True}
            if args.second_domain:
                cell["second_domain"] = args.second_domain
            if criterion == "dense" and seed != args.seeds[0]:
                continue
            if cell_key(cell) in done:
                continue
            t = time.perf_counter()
            child = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)], capture_output=True,
                                   text=True)
            if child.returncode:
                print(f"FAILED {cell}: {child.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            result = json.loads(child.stdout.strip().splitlines()[-1])
            with out.open("a") as fh:
                fh.write(json.dumps(result) + "\n")
            print(f"{criterion:>13} {reconstruct or '':>5} {cell['variant']:>6} {budget or 'dense':>5} seed {seed}: "
                  f"perplexity "
                  f"{result['perplexity']:8.2f} {result.get(f'perplexity_{args.second_domain}', float('nan')):8.2f}  "
                  f"prune {result['prune_seconds']:6.0f} s  peak RSS "
                  f"{result['peak_rss_mb']} MB  ({time.perf_counter() - t:.0f} s)", flush=True)


def table(path: Path, column: str = "perplexity", model: str | None = None, cost_budget: str = "50%") -> str:
    """Markdown: one row per recipe, one column per budget; mean (± std over seeds when several) of ``column``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if column in r and (model is None or r.get("model", "smollm2-135m") == model)]
    cells: dict[tuple, list[float]] = defaultdict(list)
    secs: dict[tuple, list[float]] = defaultdict(list)
    rss: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        key = (r["criterion"], r["reconstruct"] or "", r.get("variant", ""))
        cells[key, r["budget"]].append(r[column])
        secs[key, r["budget"]].append(r["prune_seconds"])
        rss[key, r["budget"]].append(r["peak_rss_mb"])
    budgets = [b for b in BUDGETS if any(k[1] == b for k in cells)]
    recipes = list(dict.fromkeys(k[0] for k in cells if k[1] != "dense"))
    best = {b: min((mean(v) for (k, bb), v in cells.items() if bb == b), default=None) for b in budgets}
    dense = cells.get((("dense", "", ""), "dense"))
    lines = []
    if dense:
        lines.append(f"Dense perplexity {mean(dense):.2f}.\n")
    # Cost columns: the last cell run at cost_budget (later runs are of newer code; see docs/results.md).
    lines.append("| recipe | " + " | ".join(budgets) + f" | prune s ({cost_budget}) | peak RSS MB ({cost_budget}) |")
    lines.append("|---|" + "---:|" * (len(budgets) + 2))
    for rec in recipes:
        label = rec[0] + (f" + {rec[1]} refit" if rec[1] else "") + (f" [{rec[2]}]" if rec[2] else "")
        vals = []
        for b in budgets:
            v = cells.get((rec, b))
            if not v:
                vals.append("")
                continue
            text = f"{mean(v):.2f}" + (f" ± {pstdev(v):.2f}" if len(v) > 1 else "")
            vals.append(f"**{text}**" if best[b] is not None and abs(mean(v) - best[b]) < 1e-9 else text)
        s = secs.get((rec, cost_budget))
        m = rss.get((rec, cost_budget))
        lines.append(f"| {label} | " + " | ".join(vals) + f" | {s[-1]:.0f} | {m[-1]:.0f} |" if s and m
                     else f"| {label} | " + " | ".join(vals) + " | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="docs/data/llm_results.jsonl")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", nargs="+", choices=sorted(PLANS), default=["headline"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--second-domain", choices=["botchan"], help="also report perplexity on this text")
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop")
    parser.add_argument("--column", default="perplexity", help="the result the table shows (e.g. perplexity_botchan)")
    parser.add_argument("--cost-budget", default="50%", help="the budget whose prune time and memory the table shows")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
    elif args.table:
        print(table(Path(args.out), args.column, args.model, args.cost_budget))
    else:
        drive(args)


if __name__ == "__main__":
    main()
