"""Cost of pruning-aware training: extra time per training step, in units of one forward pass.

For lenet300 and lenet5 on random 28x28 batches (batch 128, threads fixed),
measured in this run: time of a plain training step, of a step with each
regulariser, and of a forward pass; prints (step with reg - plain step) / forward.

    python benchmarks/pat_cost.py
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from relprune.experiments.models import build_model
from relprune.train.regularizers import REGULARIZERS, make_regularizer
from timing import median_seconds


def time_steps(model, x, y, reg=None, steps=100) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if reg is not None:
            loss = loss + 0.01 * reg()
        loss.backward()
        opt.step()

    return median_seconds(step, steps)


def time_forward(model, x, steps=100) -> float:
    with torch.no_grad():
        return median_seconds(lambda: model(x), steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# relprune pat_cost  torch {torch.__version__}  {platform.machine()}  threads={args.threads}  "
          f"batch={args.batch}  {time.strftime('%Y-%m-%d')}")
    print(f"{'model':9} {'regulariser':22} {'step ms':>8} {'extra ms':>9} {'extra / forward':>15}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    for name in ("lenet300", "lenet5"):
        torch.manual_seed(0)
        model = build_model(name, (1, 28, 28), 10)
        fwd = time_forward(model, x)
        timed = {}
        # The plain step is timed first and last and the lower kept, so warm-up and drift do not
        # make a regulariser look free.
        plain = time_steps(model, x, y)
        for kind in REGULARIZERS:
            reg = make_regularizer(kind, model, x[:32])
            timed[kind] = time_steps(model, x, y, reg)
            reg.detach()
        plain = min(plain, time_steps(model, x, y))
        print(f"{name:9} {'none':22} {plain * 1e3:8.2f} {0:9.2f} {0:15.2f}")
        for kind, t in timed.items():
            print(f"{name:9} {kind:22} {t * 1e3:8.2f} {(t - plain) * 1e3:9.2f} {(t - plain) / fwd:15.2f}")


if __name__ == "__main__":
    main()
