"""Peak memory of block-by-block pruning from disk against pruning the loaded model, on SmolLM2-135M.

    python benchmarks/streamed_memory.py [--out docs/data/streamed_memory.jsonl]

Each mode runs in its own fresh process (peak RSS is its own): ``memory`` loads the model and calls
``prune_sequential`` then writes the folder; ``streamed`` calls ``prune_streamed`` from the cached
safetensors folder to a new one. Both use the same 16 calibration windows of 512 tokens, Wanda at
50% (the statistics are the same for every mask-only criterion); the two written models' logits on
one evaluation window are compared. Prints one line per mode and the ratios.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "shakespeare"


def run(mode: str, out: str, samples: int, seqlen: int, criterion: str) -> dict:
    import torch

    from relprune.llm import (
        calibration_windows,
        load_model,
        prune_sequential,
        prune_streamed,
        resolve_model,
        save_pretrained,
        tokenize_file,
    )
    from relprune.llm.load import load_tokenizer
    from relprune.llm.text import batches_of

    where = resolve_model("smollm2-135m", fetch=False)
    model_mb = sum(f.stat().st_size for f in Path(where).glob("*.safetensors")) / 2**20
    tokenizer, _ = load_tokenizer(where)
    windows = calibration_windows(tokenize_file(tokenizer, DATA / "calib.txt"), samples, seqlen, 0)
    start = time.perf_counter()
    if mode == "memory":
        model, tokenizer = load_model(where, quiet=True)
        prune_sequential(model, batches_of(windows, 8), sparsity=0.5, criterion=criterion, reconstruct=False)
        save_pretrained(model, tokenizer, out)
    else:
        prune_streamed(where, out, batches_of(windows, 8), sparsity=0.5, criterion=criterion, reconstruct=False)
    seconds = time.perf_counter() - start
    return {"mode": mode, "criterion": criterion, "calibration_samples": samples, "seqlen": seqlen,
            "seconds": round(seconds, 1), "model_mb": round(model_mb),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d")}


def same_logits(a: str, b: str) -> float:
    import torch
    import transformers

    ids = torch.arange(100, 612).reshape(1, -1)
    with torch.no_grad():
        la = transformers.AutoModelForCausalLM.from_pretrained(a)(input_ids=ids).logits
        lb = transformers.AutoModelForCausalLM.from_pretrained(b)(input_ids=ids).logits
    return float((la - lb).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="docs/data/streamed_memory.jsonl")
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--criterion", default="wanda")
    args = parser.parse_args()
    if args.child:
        mode, out, samples, seqlen, criterion = args.child
        print(json.dumps(run(mode, out, int(samples), int(seqlen), criterion)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="relprune-streamed-"))
    rows = {}
    try:
        for mode in ("memory", "streamed"):
            child = subprocess.run([sys.executable, __file__, "--child", mode, str(tmp / mode),
                                    str(args.calibration_samples), str(args.seqlen), args.criterion],
                                   capture_output=True, text=True, check=True)
            rows[mode] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{mode:>8}: peak RSS {rows[mode]['peak_rss_mb']} MB for a {rows[mode]['model_mb']} MB model "
                  f"({rows[mode]['peak_rss_mb'] / rows[mode]['model_mb']:.2f}x), {rows[mode]['seconds']} s", flush=True)
        diff = same_logits(str(tmp / "memory"), str(tmp / "streamed"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m, s = rows["memory"], rows["streamed"]
    print(f"streamed / in-memory peak RSS: {s['peak_rss_mb'] / m['peak_rss_mb']:.2f}; max |logit difference| "
          f"between the two written models: {diff:.2e}")
    with open(args.out, "a") as fh:
        for r in (m, s):
            fh.write(json.dumps({**r, "max_logit_difference": diff}) + "\n")


if __name__ == "__main__":
    main()
