"""Real gains from pruning: parameters, file sizes and CPU latency of dense, masked, shrunk and
structured-pruned models, as ratios to the dense original, with test accuracy beside each row.

Uses the study's seed-0 dense models (run benchmarks/run_study.sh first, or pass --lenet300 and
--vgg with folders written by `relprune train`). Unstructured: 90% by contrib-share;
structured: 50% of the units of every hidden layer, by relative contribution (ours) and by L1 norm.
Every pruned model gets the same short masked fine-tune (1 epoch over 16,384 training samples).

    python benchmarks/deploy_gains.py
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import relprune
from relprune.deploy.export import (
    export_dense,
    export_masked,
    export_sparse,
    file_size,
    load_exported,
)
from relprune.deploy.graph import DependencyGraph
from relprune.deploy.groups import group_scores, structured_masks
from relprune.deploy.shrink import shrink
from relprune.experiments.data import load_dataset
from relprune.experiments.experiment import load_model
from relprune.experiments.training import TrainConfig, calibration_batches, evaluate, train
from timing import median_seconds


def latency_ms(model: torch.nn.Module, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    model.eval()
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        return 1e3 * median_seconds(lambda: model(x), repeats, warmup=3)


def nonzero_params(model: torch.nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in relprune.make_permanent(relprune.copy_model(model)).parameters())


def finetune(model, data, seed):
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed + 99))[:16384]
    sub = type(data)(data.name, type(data.train)(data.train.x[idx], data.train.y[idx]), data.val, data.test,
                     data.num_classes)
    train(model, sub, TrainConfig(epochs=1, lr=3e-4, seed=seed), desc="finetune")


def rows_for(folder: Path, data_dir: str, repeats: int) -> list[tuple]:
    dense, info = load_model(folder)
    data = load_dataset(info.dataset, data_dir, seed=info.seed)
    shape = tuple(info.input_shape)
    example = torch.zeros(2, *shape)
    calib = calibration_batches(data.train, 1024, seed=info.seed)
    tmp = Path(tempfile.mkdtemp())

    masked = relprune.copy_model(dense)
    stats = relprune.collect_stats(masked, calib)
    relprune.prune(masked, stats, sparsity=0.9, criterion="contrib-share")
    finetune(masked, data, info.seed)
    shrunk, _ = shrink(masked, example)

    structured = {}
    for crit in ("rc", "l1"):
        m = relprune.copy_model(dense)
        s = relprune.collect_stats(m, calib, statistics=["relative_mean"]) if crit == "rc" else None
        graph = DependencyGraph(m, example)  # half the units of every hidden layer, by the channel score
        keep = {gi: torch.argsort(v, stable=True)[round(0.5 * v.numel()):]
                for gi, v in group_scores(graph, s, crit).items()}
        relprune.apply_masks(m, structured_masks(graph, keep))
        finetune(m, data, info.seed)
        structured[crit] = shrink(m, example)[0]

    sparse_path = export_sparse(masked, tmp / "s")
    from_sparse, _ = load_exported(sparse_path)  # what a deployment reading the sparse file runs
    sizes = {
        "dense": file_size(export_dense(dense, tmp / "d")),
        "masked": file_size(export_masked(masked, tmp / "m")),
        "sparse": file_size(sparse_path),
        "shrunk": file_size(export_dense(shrunk, tmp / "sh")),
        "rc": file_size(export_dense(structured["rc"], tmp / "rc")),
        "l1": file_size(export_dense(structured["l1"], tmp / "l1")),
    }
    entries = [
        ("dense original", dense, sizes["dense"]),
        ("masked 90% (parametrised masks)", masked, sizes["masked"]),
        ("masked 90%, read back from the sparse file", from_sparse, sizes["sparse"]),
        ("shrunk from masked 90%", shrunk, sizes["shrunk"]),
        ("structured 50% units, rc", structured["rc"], sizes["rc"]),
        ("structured 50% units, L1", structured["l1"], sizes["l1"]),
    ]
    out = []
    for label, model, size in entries:
        params = sum(p.numel() for p in model.parameters())
        out.append((label, params, nonzero_params(model), size, latency_ms(model, shape, 1, repeats),
                    latency_ms(model, shape, 256, max(5, repeats // 10)), evaluate(model, data.test)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lenet300", default="runs/study/dense/lenet300_mnist_s0")
    p.add_argument("--vgg", default="runs/study/dense/vgg-small_fashion-mnist_s0")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200, help="timed runs at batch 1 (batch 256: a tenth)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# relprune deploy_gains  torch {torch.__version__}  {platform.machine()}  threads={args.threads}  "
          f"{time.strftime('%Y-%m-%d')}")
    for folder in (args.lenet300, args.vgg):
        rows = rows_for(Path(folder), args.data_dir, args.repeats)
        base = rows[0]
        print(f"\n## {folder}\n")
        print("| model | params | non-zero | file | latency b=1 | latency b=256 | test acc |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, params, nz, size, l1, l256, acc in rows:
            print(f"| {label} | {params} ({params / base[1]:.2f}x) | {nz} ({nz / base[2]:.2f}x) | "
                  f"{size / 1024:.0f} KiB ({size / base[3]:.2f}x) | {l1:.3f} ms ({l1 / base[4]:.2f}x) | "
                  f"{l256:.2f} ms ({l256 / base[5]:.2f}x) | {100 * acc:.2f}% |")


if __name__ == "__main__":
    main()
