"""Time of the default recipe's linear algebra on an idle machine and beside busy processes.

A user's machine is shared: another process may hold a core while relprune prunes. This measures
the calls of one ADMM layer (SmolLM2's down_proj shape: a 576 x 1536 weight, a 1536 x 1536 Gram) -
``eigh`` with torch's default threads and with one, a Cholesky, a matrix product, and the whole
``admm_prune`` of the layer as the library runs it - with 0, 1 and 2 busy processes beside it (each a
CPU-bound Python loop), alternating the loads in rounds so drift hits them alike. It prints each
call's median time per load and its ratio to the idle time, and appends one JSON line per (call, load).

    python benchmarks/contention.py --out docs/data/contention_issue32.jsonl
    python benchmarks/contention.py --rounds 2 --quick     # a smaller layer, for a look
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import platform
import statistics
import time
from collections.abc import Callable

import torch

from relprune.core import admm
from relprune.core.admm import admm_prune


def _busy(stop: mp.Event) -> None:  # type: ignore[valid-type]
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x = (x + i * i) % 1_000_003


def _layer(inputs: int, outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * inputs, inputs, generator=g) @ torch.randn(inputs, inputs, generator=g) / inputs**0.5
    return torch.randn(outputs, inputs, generator=g), x.T @ x


def _with_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def _unbounded(weight: torch.Tensor, gram: torch.Tensor) -> object:
    """admm_prune as it was before issue 32: its eigendecomposition on torch's default threads."""
    bounded = admm.bounded_threads
    admm.bounded_threads = contextlib.nullcontext  # type: ignore[assignment]
    try:
        return admm_prune(weight, gram, sparsity=0.5)
    finally:
        admm.bounded_threads = bounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (idle, 1 busy, 2 busy) (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per call and load per round")
    parser.add_argument("--quick", action="store_true", help="a 768-input layer instead of 1536")
    parser.add_argument("--out", help="append the results here (JSON lines)")
    args = parser.parse_args()

    inputs, outputs = (768, 288) if args.quick else (1536, 576)
    weight, gram = _layer(inputs, outputs)
    h32 = (gram / gram.diagonal().mean()).float() + 0.01 * torch.eye(inputs)
    default_threads = torch.get_num_threads()
    calls: dict[str, Callable[[], object]] = {
        f"eigh, {default_threads} threads": lambda: torch.linalg.eigh(h32),
        "eigh, 1 thread": _with_threads(1, lambda: torch.linalg.eigh(h32)),
        f"cholesky, {default_threads} threads": lambda: torch.linalg.cholesky(h32.double()),
        f"matmul {outputs}x{inputs}x{inputs}, {default_threads} threads": lambda: weight @ h32,
        "admm_prune 50% (as the library runs it)": lambda: admm_prune(weight, gram, sparsity=0.5),
        "admm_prune 50%, eigh on default threads (before)": lambda: _unbounded(weight, gram),
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
