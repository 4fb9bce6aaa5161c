"""Prune time and peak memory of the default recipe against model size, in memory and streamed from disk.

    python benchmarks/scaling.py --out docs/data/scaling_issue32.jsonl
    python benchmarks/scaling.py --sizes 135m --blocks 1 --samples 2     # a quick look

No pretrained model larger than 300M parameters is at hand here, so the cost curve uses random-weight models
of the SmolLM2 family's published shapes (135M, 360M and 1.7B: width, MLP width, heads, vocabulary), cut to
``--blocks`` decoder blocks so that each run fits in minutes. The cost of block-by-block pruning is a sum over
blocks of one shape, so each row gives the per-block time and memory the forecast for the full depth is built
from (docs/results.md). Each (size, mode) runs in a fresh process so its peak resident memory is its own:
``memory`` loads the model, calls ``prune_sequential`` and saves; ``streamed`` calls ``prune_streamed`` from
the saved folder to a new one. Calibration: ``--samples`` random token windows of ``--seqlen`` (the cost
does not depend on the text), batches of 8, the default recipe (ADMM at 50%, row scope).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The SmolLM2 family's shapes (the Hugging Face configs of SmolLM2-135M, -360M and -1.7B); depth is the
#: full model's, the benchmark builds ``--blocks`` of them.
SIZES: dict[str, dict[str, int]] = {
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
             "num_hidden_layers": 30},
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_attention_heads": 15, "num_key_value_heads": 5,
             "num_hidden_layers": 32},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32,
             "num_hidden_layers": 24},
}
VOCAB = 49152
#: Shapes the forecast extrapolates to (their Hugging Face configs): Llama 3.2 1B and 3B, Llama 3.1 8B.
FORECAST: dict[str, dict[str, int]] = {
    "1B (Llama 3.2)": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
                       "num_key_value_heads": 8, "num_hidden_layers": 16, "vocab_size": 128256},
    "3B (Llama 3.2)": {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
                       "num_key_value_heads": 8, "num_hidden_layers": 28, "vocab_size": 128256},
    "8B (Llama 3.1)": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                       "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256},
}


def layer_shapes(shape: dict[str, int]) -> list[tuple[int, int]]:
    """(outputs, inputs) of a Llama block's seven projections."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def cost_terms(shape: dict[str, int], tokens: int) -> tuple[float, float]:
    """A block's two cost terms: the solver's, sum over projections of out * in^2 + in^3 (ADMM's products
    with the in x in inverse, the Cholesky factors it is formed from, the exact re-fit), and the statistics',
    tokens x weights (the block's forward pass and the Grams)."""
    shapes = layer_shapes(shape)
    return (float(sum(o * i * i + i**3 for o, i in shapes)), float(tokens * sum(o * i for o, i in shapes)))


def _fit(x, y):
    """Non-negative least squares for two columns: the joint fit, or the better one-column fit."""
    import torch

    coef = torch.linalg.lstsq(x, y.reshape(-1, 1)).solution.reshape(-1)
    if bool((coef >= 0).all()):
        return coef
    best = None
    for k in range(x.shape[1]):
        c = torch.zeros(x.shape[1], dtype=x.dtype)
        c[k] = float((x[:, k] @ y) / (x[:, k] @ x[:, k]))
        err = float((x @ c - y).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, c)
    return best[1]


def working_set_terms(shape: dict[str, int], tokens: int) -> tuple[float, float]:
    """A block's working set in MiB, split into what is known from the shapes (the float64 running Grams of
    its seven projections, and ADMM's float64 scaled Gram, its float32 copy, the inverse and the Cholesky
    factor and shifted copy it is formed from, for its widest input: 24 bytes x in^2) and the activations' term,
    tokens x (hidden + MLP width) x 4 bytes, whose multiple the fit finds."""
    shapes = layer_shapes(shape)
    known = sum(8 * i * i for _, i in shapes) + 24 * max(i for _, i in shapes) ** 2
    return known / 2**20, tokens * (shape["hidden_size"] + shape["intermediate_size"]) * 4 / 2**20


def cpu_gflops() -> float:
    """This machine's float32 matrix-product throughput (2048^3, torch's default threads; best of five)."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    flops = 2 * 2048**3 / best / 1e9
    print(f"this CPU: {flops:.0f} GFLOP/s float32 matrix products ({torch.get_num_threads()} threads)")
    return flops


def forecast(rows: list[dict], tokens: int, gpu_speedup: float) -> None:
    """Fit seconds per block = a * solver term + b * statistics term to the measured rows (non-negative
    least squares, in memory), and the activations' multiple of the working set to the measured peaks; print
    the whole-model forecast for FORECAST's shapes: time, and peak memory in memory (the interpreter, the
    weights in float32, one block's working set) and streamed (the interpreter, the embedding, one block's
    working set)."""
    import torch

    memory = [r for r in rows if r["mode"] == "memory"]
    if len(memory) < 2:
        raise SystemExit("the forecast needs at least two measured sizes (run the benchmark first)")
    x = torch.tensor([cost_terms(r, tokens) for r in memory], dtype=torch.float64)
    y = torch.tensor([r["prune_seconds_per_block"] for r in memory], dtype=torch.float64)
    coef = _fit(x, y)
    print(f"time fit: seconds a block = {coef[0]:.3e} x sum(out in^2 + in^3) + {coef[1]:.3e} x tokens x weights")
    for r, pred in zip(memory, (x @ coef).tolist(), strict=True):
        print(f"  {r['size']:>5}: measured {r['prune_seconds_per_block']:7.1f} s a block, fit {pred:7.1f} s")

    def fixed(r: dict) -> float:  # what a row's peak holds besides the working set
        embedding = r["rest_params"] * 4 / 2**20
        weights = r["params"] * 4 / 2**20 if r["mode"] == "memory" else embedding
        return r["import_rss_mib"] + weights

    extra = torch.tensor([r["peak_rss_mib"] - fixed(r) - working_set_terms(r, tokens)[0] for r in rows],
                         dtype=torch.float64)
    acts = torch.tensor([working_set_terms(r, tokens)[1] for r in rows], dtype=torch.float64)
    multiple = float((acts @ extra) / (acts @ acts))
    print(f"memory fit: working set = known Grams and ADMM buffers + {multiple:.2f} x tokens x (hidden + MLP "
          "width) x 4 bytes")
    for r in rows:
        known, act = working_set_terms(r, tokens)
        print(f"  {r['size']:>5} {r['mode']:>8}: measured peak {r['peak_rss_mib']:6d} MiB, fit "
              f"{fixed(r) + known + multiple * act:6.0f} MiB")
    base = min(r["import_rss_mib"] for r in rows)
    print(f"GPU: the solver's time divided by {gpu_speedup:.0f} (the assumed GPU throughput over this CPU's)")
    print(f"\n{'model':16} {'blocks':>6} {'s a block':>9} {'CPU hours':>9} {'GPU minutes':>11} "
          f"{'in-memory GiB':>13} {'streamed GiB':>12}")
    for name, shape in FORECAST.items():
        per_block = float(torch.tensor(cost_terms(shape, tokens), dtype=torch.float64) @ coef)
        total = per_block * shape["num_hidden_layers"]
        block = sum(o * i for o, i in layer_shapes(shape)) + 3 * shape["hidden_size"]
        embedding = shape["vocab_size"] * shape["hidden_size"] * 4 / 2**20
        known, act = working_set_terms(shape, tokens)
        work = known + multiple * act
        in_memory = base + block * shape["num_hidden_layers"] * 4 / 2**20 + embedding + work
        print(f"{name:16} {shape['num_hidden_layers']:6d} {per_block:9.0f} {total / 3600:9.1f} "
              f"{total / gpu_speedup / 60:11.1f} {in_memory / 1024:13.1f} {(base + embedding + work) / 1024:12.1f}")


def _config(size: str, blocks: int):
    import transformers

    shape = dict(SIZES[size], num_hidden_layers=blocks)
    return transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=True,
                                    rope_theta=10000.0, **shape)


def build(size: str, blocks: int, folder: str) -> dict:
    """Save a random-weight model of ``size`` with ``blocks`` blocks to ``folder``; its parameter counts."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config(size, blocks)).float()
    model.save_pretrained(folder)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"block_params": block, "params": total, "rest_params": total - blocks * block}


def run(mode: str, folder: str, out: str, samples: int, seqlen: int) -> dict:
    import torch
    import transformers

    from relprune.llm import prune_sequential, prune_streamed
    from relprune.llm.text import batches_of

    with open("/proc/self/status") as fh:  # the interpreter, torch and transformers before any model
        base = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, VOCAB, (samples, seqlen), generator=g)
    batches = batches_of(windows, 8)
    start = time.perf_counter()
    if mode == "memory":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        loaded = time.perf_counter()
        prune_sequential(model, batches, sparsity=0.5)
        pruned = time.perf_counter()
        model.save_pretrained(out)
    else:
        loaded = start
        prune_streamed(folder, out, batches, sparsity=0.5)
        pruned = time.perf_counter()
    return {"mode": mode, "seconds": round(time.perf_counter() - start, 1),
            "prune_seconds": round(pruned - loaded, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "import_rss_mib": round(base), "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["135m", "360m", "1.7b"])
    parser.add_argument("--modes", nargs="+", choices=["memory", "streamed"], default=["memory", "streamed"])
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks per model (default: 2)")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (default: 16, as `llm prune`)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", help="append one JSON line per (size, mode) here")
    parser.add_argument("--forecast", help="fit the cost model to this JSON-lines file and print the forecast")
    parser.add_argument("--gpu-tflops", type=float, default=10.0,
                        help="--forecast: the float32 matrix-product throughput assumed for one GPU, TFLOP/s "
                             "(default: 10, about half an A100's float32 peak); this CPU's is measured")
    args = parser.parse_args()
    if args.forecast:
        rows = [json.loads(line) for line in Path(args.forecast).read_text().splitlines() if line.strip()]
        forecast(rows, args.samples * args.seqlen, args.gpu_tflops * 1e3 / cpu_gflops())
        return
    if args.build:
        size, blocks, folder = args.build
        print(json.dumps(build(size, int(blocks), folder)))
        return
    if args.child:
        mode, folder, out, samples, seqlen = args.child
        print(json.dumps(run(mode, folder, out, int(samples), int(seqlen))))
        return
    import torch

    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "torch": torch.__version__, "recipe": "default (admm, 50%, row)", "blocks": args.blocks,
            "calibration_samples": args.samples, "seqlen": args.seqlen, "weights": "random (seed 0)"}
    for size in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"relprune-scaling-{size}-"))
        try:
            built = subprocess.run([sys.executable, __file__, "--build", size, str(args.blocks), str(tmp / "dense")],
                                   capture_output=True, text=True, check=True)
            counts = json.loads(built.stdout.strip().splitlines()[-1])
            model_mib = sum(f.stat().st_size for f in (tmp / "dense").glob("*.safetensors")) / 2**20
            for mode in args.modes:
                child = subprocess.run([sys.executable, __file__, "--child", mode, str(tmp / "dense"),
                                        str(tmp / mode), str(args.samples), str(args.seqlen)],
                                       capture_output=True, text=True)
                if child.returncode:
                    raise SystemExit(f"{size} {mode} failed: {child.stderr[-800:]}")
                row = {**meta, "size": size, **SIZES[size], "num_hidden_layers_built": args.blocks, **counts,
                       "model_mib": round(model_mib), **json.loads(child.stdout.strip().splitlines()[-1])}
                row["prune_seconds_per_block"] = round(row["prune_seconds"] / args.blocks, 1)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                shutil.rmtree(tmp / mode, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
