"""ADMM's time and output error on real layers, for an A/B of two builds of the solver.

``--capture DIR`` runs the default prune of ``--model`` at 50% (16 x 512 calibration tokens) and saves, for
the blocks of ``--blocks``, each Linear's weight and input Gram as the solver received them (one file a layer,
``l<index>.pt``, in the order the solver ran). ``--solve DIR`` runs this build's ``admm_prune`` on every saved
layer at 50%, 2:4 and 70%, one after another on an otherwise idle machine, and appends one JSON line per
(layer, budget) with its seconds and output error tr((W - W') H (W - W')^T). ``--compare A B`` prints B's
total time over A's and B's error over A's per budget (mean, min and max over the layers).

    python benchmarks/admm_layers.py --capture /tmp/grams
    PYTHONPATH=<old worktree>/src python benchmarks/admm_layers.py --solve /tmp/grams --out old.jsonl
    python benchmarks/admm_layers.py --solve /tmp/grams --out new.jsonl
    python benchmarks/admm_layers.py --compare old.jsonl new.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"50%": {"sparsity": 0.5}, "2:4": {"n_m": (2, 4)}, "70%": {"sparsity": 0.7}}


def capture(args: argparse.Namespace) -> None:
    import relprune.core.admm as admm
    from relprune.llm import oneshot

    out = Path(args.capture)
    out.mkdir(parents=True, exist_ok=True)
    solve = admm.admm_prune
    seen = {"layers": 0}
    per_block = args.layers_per_block

    def saving(weight: torch.Tensor, hessian: torch.Tensor, **budget: object) -> object:
        index = seen["layers"]
        seen["layers"] += 1
        if index // per_block in args.blocks:
            torch.save({"w": weight.detach().clone(), "h": hessian.clone(), "kw": budget}, out / f"l{index}.pt")
        return solve(weight, hessian, **budget)

    admm.admm_prune = saving  # the criterion looks the solver up in its module at each call
    try:
        oneshot(args.model, args.calibration, samples=16, sparsity=0.5)
    finally:
        admm.admm_prune = solve
    print(f"saved {len(list(out.glob('l*.pt')))} layers to {out}")


def _layers(folder: Path) -> list[Path]:
    return sorted(folder.glob("l*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem)))


def solve(args: argparse.Namespace) -> None:
    import relprune
    from relprune.core.admm import admm_prune, layer_error

    commit = subprocess.run(["git", "-C", str(Path(relprune.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "commit": commit}
    total = 0.0
    layers = _layers(Path(args.solve))
    with open(args.out, "a") as fh:
        for path in layers:
            saved = torch.load(path)
            w, h = saved["w"], saved["h"]
            for name, budget in BUDGETS.items():
                t0 = time.perf_counter()
                new, _ = admm_prune(w, h, **budget)
                seconds = time.perf_counter() - t0
                total += seconds
                row = {**meta, "layer": path.stem, "shape": list(w.shape), "budget": name, "seconds": seconds,
                       "error": layer_error(w, new, h)}
                fh.write(json.dumps(row) + "\n")
    print(f"{commit}: {total:.1f} s over {len(layers)} layers x {len(BUDGETS)} budgets")


def compare(a_path: str, b_path: str) -> None:
    a, b = ({(r["layer"], r["budget"]): r for r in map(json.loads, Path(p).read_text().splitlines())}
            for p in (a_path, b_path))
    ratios: dict[str, list[float]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for key in a.keys() & b.keys():
        budget = key[1]
        ratios[budget].append(b[key]["error"] / a[key]["error"])
        seconds[budget][0] += a[key]["seconds"]
        seconds[budget][1] += b[key]["seconds"]
    print(f"{'budget':7} {'A s':>7} {'B s':>7} {'B/A time':>9} {'error B/A mean':>15} {'min':>7} {'max':>7}")
    for budget in BUDGETS:
        r, (sa, sb) = ratios[budget], seconds[budget]
        if r:
            print(f"{budget:7} {sa:7.1f} {sb:7.1f} {sb / sa:9.3f} {sum(r) / len(r):15.4f} {min(r):7.4f} {max(r):7.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--capture", help="run the default prune and save the chosen blocks' layers here")
    mode.add_argument("--solve", help="time this build's admm_prune on the layers saved here")
    mode.add_argument("--compare", nargs=2, metavar=("A", "B"), help="B's time and error over A's")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", default=str(ROOT.parent / "shared/data/shakespeare/calib.txt"))
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 7, 15, 23, 29])
    parser.add_argument("--layers-per-block", type=int, default=7, help="Linears a decoder block holds (7 in "
                        "SmolLM2 and Gemma 3)")
    parser.add_argument("--out", help="--solve: append the rows here")
    args = parser.parse_args()
    if args.capture:
        capture(args)
    elif args.solve:
        if not args.out:
            parser.error("--solve needs --out")
        solve(args)
    else:
        compare(*args.compare)


if __name__ == "__main__":
    main()
