"""Cost of collect_stats relative to a plain forward pass over the same calibration set.

Prints, for an MLP (784-1024-1024-10) and a small CNN, measured in this run:
time(collect_stats) / time(forward) for all weight-shaped statistics and for
the statistics of `rc` alone, and peak extra memory / weight memory, at two
calibration-set sizes (the ratios should not grow with the size).

Memory is the peak resident set of a fresh subprocess that runs only that
job, minus the peak of one that runs only the forward pass.

    python benchmarks/stats_cost.py            # full run, about a minute
    python benchmarks/stats_cost.py --quick    # smaller sets
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import relprune

STAT_SETS = {
    "all": None,
    "rc": ["relative_mean"],
}
ACTIVATION_STATS = [s for s in relprune.STATISTICS if s != "weight_grad"]


def make_model(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10)), (1, 28, 28)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    ), (1, 28, 28)


def batches(shape: tuple[int, ...], samples: int, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(batch, *shape, generator=g) for _ in range(samples // batch)]


def run_job(kind: str, job: str, samples: int, batch: int) -> float:
    model, shape = make_model(kind)
    model.eval()
    data = batches(shape, samples, batch)
    start = time.perf_counter()
    if job == "forward":
        with torch.no_grad():
            for x in data:
                model(x)
    else:
        stats = ACTIVATION_STATS if STAT_SETS[job] is None else STAT_SETS[job]
        relprune.collect_stats(model, data, statistics=stats)
    return time.perf_counter() - start


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    seconds = run_job(args.model, args.job, args.samples, args.batch)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_bytes": peak_kib * 1024}))


def in_subprocess(model: str, job: str, samples: int, batch: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--model", model, "--job", job, "--samples", str(samples),
         "--batch", str(batch), "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller calibration sets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timing runs per cell (median)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--job", default="forward", help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=2048, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    sizes = [1024, 4096] if args.quick else [2048, 8192]
    print(f"# relprune stats_cost  torch {torch.__version__}  {platform.machine()}  threads={args.threads}  "
          f"batch={args.batch}  {time.strftime('%Y-%m-%d')}")
    print(f"{'model':5} {'samples':>7} {'stats':>5} {'time ratio':>10} {'target':>6} {'mem ratio':>9}")
    for kind in ("mlp", "cnn"):
        model, _ = make_model(kind)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for samples in sizes:
            run_job(kind, "forward", args.batch * 2, args.batch)  # warm-up
            fwd_peak = in_subprocess(kind, "forward", samples, args.batch, args.threads)["peak_bytes"]
            for job, target in (("all", 8), ("rc", 3)):
                # Forward and statistics timed back to back in each repeat, so machine
                # load drifts affect both sides of a ratio alike; median over repeats.
                ratios = []
                for _ in range(args.repeats):
                    fwd = run_job(kind, "forward", samples, args.batch)
                    ratios.append(run_job(kind, job, samples, args.batch) / fwd)
                peak = in_subprocess(kind, job, samples, args.batch, args.threads)["peak_bytes"]
                mem = max(peak - fwd_peak, 0) / weight_bytes
                print(f"{kind:5} {samples:7d} {job:>5} {statistics.median(ratios):10.2f} {target:>6} {mem:9.2f}")


if __name__ == "__main__":
    main()
