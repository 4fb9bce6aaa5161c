"""Time of the default recipe's linear algebra on an idle machine and beside busy processes.

A user's machine is shared: another process may hold a core while relprune prunes. This measures
the calls of one ADMM layer (SmolLM2's down_proj shape: a 576 x 1536 weight, a 1536 x 1536 Gram) -
``eigh`` with torch's default threads and with one (ADMM's ridge steps used it before the fifth session of
issue 32), ADMM's ridge factor as the library forms it (a float32 Cholesky on one thread), a matrix
product, and the whole ``admm_prune`` of the layer as the library runs it - with 0, 1 and 2 busy processes
beside it (each a CPU-bound Python loop), alternating the loads in rounds so drift hits them alike. It prints
each call's median time per load and its ratio to the idle time, and appends one JSON line per (call, load).

    python benchmarks/contention.py --out docs/data/contention_issue32.jsonl
    python benchmarks/contention.py --rounds 2 --quick     # a smaller layer, for a look

``--prune`` times whole ``relprune llm prune`` runs instead (each a fresh process, its peak resident memory
from the kernel's accounting of that child): the default recipe, SparseGPT and Wanda (as published: no
re-fit), and our variant SparseGPT followed by the exact re-fit, at 50% (``--pattern 2:4``: at 2:4) on ``--model``,
with 0, 1 and 2 busy processes beside, in alternating rounds.

    python benchmarks/contention.py --prune --model smollm2-135m --out docs/data/contention_issue32_prune.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from relprune.core.admm import admm_prune, ridge_factor
from relprune.core.threads import bounded_threads


def _busy(stop: mp.Event) -> None:  # type: ignore[valid-type]
    """A CPU-bound loop until told to stop, or until its parent is gone (a killed benchmark leaves no load)."""
    parent = os.getppid()
    x = 0
    while not stop.is_set() and os.getppid() == parent:
        for i in range(100_000):
            x = (x + i * i) % 1_000_003


def _layer(inputs: int, outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * inputs, inputs, generator=g) @ torch.randn(inputs, inputs, generator=g) / inputs**0.5
    return torch.randn(outputs, inputs, generator=g), x.T @ x


def _one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` on one thread (:func:`relprune.core.threads.bounded_threads`)."""
    def run() -> object:
        with bounded_threads(1):
            return fn()
    return run


#: The recipes ``--prune`` times: the default, the two published baselines as their authors run them (no re-fit
#: after the mask; until the fifth session of issue 32 the row called SparseGPT ran our exact re-fit after it,
#: which is now the labelled variant ``sparsegpt-refit``).
PRUNE_METHODS = {"default (admm)": [], "sparsegpt": ["--criterion", "sparsegpt", "--reconstruct", "none"],
                 "sparsegpt-refit (SparseGPT + our exact re-fit)": ["--criterion", "sparsegpt"],
                 "wanda": ["--criterion", "wanda", "--reconstruct", "none"]}


def _timed_prune(args: argparse.Namespace, extra: list[str], out: str) -> tuple[float, float]:
    """(seconds, peak resident MiB) of one ``relprune llm prune`` in a fresh process."""
    budget = ["--n-m", args.pattern] if ":" in args.pattern else ["--sparsity", args.pattern]
    cmd = [sys.executable, "-m", "relprune", "llm", "prune", "--model", args.model, *budget,
           "--calibration", args.calibration, "--calibration-samples", str(args.samples), "--seqlen", "512",
           "--out", out, *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-500:]}")
    return seconds, usage.ru_maxrss / 1024


def _with_busy(busy: int, fn: Callable[[], object]) -> object:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    workers = [ctx.Process(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
    for w in workers:
        w.start()
    time.sleep(1.0 if busy else 0.2)
    try:
        return fn()
    finally:
        stop.set()
        for w in workers:
            w.join()


def prune_main(args: argparse.Namespace) -> None:
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "cores": mp.cpu_count(),
            "torch": torch.__version__, "default_threads": torch.get_num_threads(), "model": args.model,
            "pattern": args.pattern, "calibration_samples": args.samples, "seqlen": 512}
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    methods = {k: v for k, v in PRUNE_METHODS.items() if args.methods is None or k.split()[0] in args.methods}
    for r in range(args.rounds):
        for busy in args.busy:
            for label, extra in methods.items():
                with tempfile.TemporaryDirectory() as tmp:
                    seconds, peak = _with_busy(busy, lambda extra=extra, tmp=tmp: _timed_prune(args, extra,
                                                                                             f"{tmp}/out"))
                results.setdefault((label, busy), []).append((seconds, peak))
                line = {**meta, "method": label, "busy": busy, "round": r, "seconds": seconds, "peak_mib": peak}
                print(json.dumps(line), flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(line) + "\n")
    print(f"\n{'method':16} " + " ".join(f"{f'{b} busy s':>10} {'x idle':>7} {'MiB':>6}" for b in args.busy))
    for label in methods:
        idle = statistics.median(s for s, _ in results[(label, 0)]) if 0 in args.busy else None
        cells = []
        for b in args.busy:
            sec = statistics.median(s for s, _ in results[(label, b)])
            ratio = f"{sec / idle:7.2f}" if idle else f"{'-':>7}"  # no idle run in this invocation: no ratio
            cells.append(f"{sec:10.1f} {ratio} {max(m for _, m in results[(label, b)]):6.0f}")
        print(f"{label:16} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prune", action="store_true", help="time whole `relprune llm prune` runs")
    parser.add_argument("--model", default="smollm2-135m", help="--prune: the model (default: smollm2-135m)")
    parser.add_argument("--calibration", default="../shared/data/shakespeare/calib.txt")
    parser.add_argument("--pattern", default="0.5", choices=["0.5", "2:4"],
                        help="--prune: the budget, a sparsity or N:M (default: 0.5)")
    parser.add_argument("--samples", type=int, default=16, help="--prune: calibration windows of 512 tokens")
    parser.add_argument("--methods", nargs="+", choices=["default", "sparsegpt", "sparsegpt-refit", "wanda"],
                        help="--prune: the recipes to time (default: all four)")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy processes beside (default: 0 1 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (idle, 1 busy, 2 busy) (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per call and load per round")
    parser.add_argument("--quick", action="store_true", help="a 768-input layer instead of 1536")
    parser.add_argument("--out", help="append the results here (JSON lines)")
    args = parser.parse_args()
    if args.prune:
        prune_main(args)
        return

    inputs, outputs = (768, 288) if args.quick else (1536, 576)
    weight, gram = _layer(inputs, outputs)
    h32 = (gram / gram.diagonal().mean()).float() + 0.01 * torch.eye(inputs)
    default_threads = torch.get_num_threads()
    calls: dict[str, Callable[[], object]] = {
        f"eigh, {default_threads} threads": lambda: torch.linalg.eigh(h32),
        "eigh, 1 thread": _one_thread(lambda: torch.linalg.eigh(h32)),
        "ADMM's ridge factor (float32 Cholesky, 1 thread)": lambda: ridge_factor(h32, 0.1),
        f"matmul {outputs}x{inputs}x{inputs}, {default_threads} threads": lambda: weight @ h32,
        "admm_prune 50% (as the library runs it)": lambda: admm_prune(weight, gram, sparsity=0.5),
    }
    for call in calls.values():  # warm-up
        call()
    times: dict[tuple[str, int], list[float]] = {(c, b): [] for c in calls for b in (0, 1, 2)}
    ctx = mp.get_context("spawn")
    for r in range(args.rounds):
        for busy in (0, 1, 2):
            stop = ctx.Event()
            workers = [ctx.Process(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
            for w in workers:
                w.start()
            time.sleep(1.0 if busy else 0.2)
            for name, call in calls.items():
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    call()
                    times[(name, busy)].append(time.perf_counter() - t0)
            stop.set()
            for w in workers:
                w.join()
            print(f"round {r + 1}/{args.rounds}, {busy} busy: done", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "cores": mp.cpu_count(),
            "torch": torch.__version__, "default_threads": default_threads, "layer": [outputs, inputs],
            "rounds": args.rounds, "repeats": args.repeats}
    print(f"\n{'call':48} {'idle s':>8} {'1 busy':>8} {'x idle':>7} {'2 busy':>8} {'x idle':>7}")
    lines = []
    for name in calls:
        med = {b: statistics.median(times[(name, b)]) for b in (0, 1, 2)}
        print(f"{name:48} {med[0]:8.3f} {med[1]:8.3f} {med[1] / med[0]:7.2f} {med[2]:8.3f} {med[2] / med[0]:7.2f}")
        for b in (0, 1, 2):
            lines.append({**meta, "call": name, "busy": b, "median_s": med[b], "times_s": times[(name, b)],
                          "ratio_to_idle": med[b] / med[0]})
    if args.out:
        with open(args.out, "a") as fh:
            for line in lines:
                fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
