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
    args = parser.parse_args()
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
