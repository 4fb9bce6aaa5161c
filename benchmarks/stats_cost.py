"""Cost of collect_stats relative to a plain forward pass over the same calibration set.

Prints, for an MLP (784-1024-1024-10) and a small CNN, measured in this run:
time(collect_stats) / time(forward) for all weight-shaped statistics and for
the statistics of `rc` alone, and peak extra memory / weight memory, at two
calibration-set sizes (the ratios should not grow with the size).

Memory: the peak of bytes allocated (glibc mallinfo2, sampled every 0.2 ms)
above the level before the job, minus the same for the plain forward pass,
divided by the model's weight bytes.

    python benchmarks/stats_cost.py            # full run, about a minute
    python benchmarks/stats_cost.py --quick    # smaller sets
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import threading
import time

import torch
from torch import nn

import relprune

STAT_SETS: dict[str, list[str] | None] = {
    "all": None,
    "rc": ["relative_mean"],
}
# Per-criterion rows: what each criterion's collect_stats call gathers.
for _name, _crit in relprune.CRITERIA.items():
    if _crit.statistics:
        STAT_SETS[f"crit:{_name}"] = sorted(_crit.statistics)
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


def prepare(kind: str, job: str, samples: int, batch: int) -> tuple[nn.Module, list]:
    """The model in eval mode and the calibration batches (labelled when the job needs gradients)."""
    model, shape = make_model(kind)
    model.eval()
    data: list = batches(shape, samples, batch)
    if job.startswith("crit:") and "weight_grad" in (STAT_SETS[job] or []):
        g = torch.Generator().manual_seed(2)
        data = [(x, torch.randint(0, 10, (len(x),), generator=g)) for x in data]
    return model, data


def execute(model: nn.Module, job: str, data: list) -> None:
    if job == "forward":
        with torch.no_grad():
            for x in data:
                model(x)
    else:
        wanted = STAT_SETS[job] or ACTIVATION_STATS
        if any(isinstance(m, nn.Conv2d) for m in model.modules()):
            # The input Gram matrix (SparseGPT, re-fits) is a Linear-only statistic: on the CNN,
            # "all" means every statistic a conv layer has, and Gram-based criteria are skipped.
            wanted = [s for s in wanted if s != "input_gram"]
        relprune.collect_stats(model, data, statistics=wanted)


def run_job(kind: str, job: str, samples: int, batch: int) -> float:
    model, data = prepare(kind, job, samples, batch)
    start = time.perf_counter()
    execute(model, job, data)
    return time.perf_counter() - start


class _Mallinfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _allocated() -> int:
    """Bytes the C allocator has handed out now (glibc mallinfo2: small blocks plus mmapped ones)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _Mallinfo


def peak_extra_bytes(kind: str, job: str, samples: int, batch: int) -> int:
    """Peak allocated bytes above the level before the job (sampled every 0.2 ms)."""
    model, data = prepare(kind, job, samples, batch)
    base = _allocated()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _allocated())
            time.sleep(0.0002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        execute(model, job, data)
    finally:
        done.set()
        t.join()
    return peak[0] - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller calibration sets")
    p.add_argument("--criteria", action="store_true",
                   help="also one row per criterion (its own statistics) at the larger size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timing runs per cell (median)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [1024, 4096] if args.quick else [2048, 8192]
    print(f"# relprune stats_cost  torch {torch.__version__}  {platform.machine()}  threads={args.threads}  "
          f"batch={args.batch}  {time.strftime('%Y-%m-%d')}")
    print(f"{'model':5} {'samples':>7} {'statistics of':>13} {'time ratio':>10} {'target':>6} {'mem ratio':>9}")
    for kind in ("mlp", "cnn"):
        model, _ = make_model(kind)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        run_job(kind, "forward", args.batch * 2, args.batch)  # warm-up

        def measure(job: str, samples: int, kind: str = kind, weight_bytes: int = weight_bytes) -> tuple[float, float]:
            # Forward and statistics timed back to back in each repeat, so machine load drifts
            # affect both sides of a ratio alike; median over repeats.
            ratios = []
            for _ in range(args.repeats):
                fwd = run_job(kind, "forward", samples, args.batch)
                ratios.append(run_job(kind, job, samples, args.batch) / fwd)
            extra = peak_extra_bytes(kind, job, samples, args.batch) - \
                peak_extra_bytes(kind, "forward", samples, args.batch)
            return statistics.median(ratios), max(extra, 0) / weight_bytes

        for samples in sizes:
            for job, target in (("all", 8), ("rc", 3)):
                ratio, mem = measure(job, samples)
                print(f"{kind:5} {samples:7d} {job:>13} {ratio:10.2f} {target:>6} {mem:9.2f}")
        if args.criteria:
            for job in (j for j in STAT_SETS if j.startswith("crit:")):
                if kind == "cnn" and set(STAT_SETS[job] or []) <= {"input_gram"}:
                    continue  # a Gram-only criterion (sparsegpt, admm, ...) has nothing to gather on convs
                ratio, mem = measure(job, sizes[-1])
                print(f"{kind:5} {sizes[-1]:7d} {job[5:]:>13} {ratio:10.2f} {'':>6} {mem:9.2f}")


if __name__ == "__main__":
    main()
