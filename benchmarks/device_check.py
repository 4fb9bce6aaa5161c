"""The headline recipe on whatever device is here: one command for a GPU run.

    python benchmarks/device_check.py                          # CUDA when present, else the CPU
    python benchmarks/device_check.py --device cuda --dtype bfloat16 --model owner/name

Loads the model on the device in the dtype, prunes it with the language-model default recipe
(``obs`` + exact re-fit, 50%, block by block) on ``--samples`` windows of 512 tokens of the
Shakespeare calibration text, and prints the dense and pruned perplexity on 16 windows of the
evaluation text and the seconds each step took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from relprune.llm import evaluation_windows, load_model, oneshot, perplexity, tokenize_file
from relprune.llm.load import DTYPES, resolve_device

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    device = resolve_device(args.device)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, quiet=True, device=device, dtype=args.dtype)
    loaded = time.perf_counter() - start
    windows = evaluation_windows(tokenize_file(tokenizer, args.data / "eval.txt"), 512, 16)
    start = time.perf_counter()
    dense = perplexity(model, windows, batch_size=4)
    evaluated = time.perf_counter() - start
    start = time.perf_counter()
    result = oneshot(model, args.data / "calib.txt", tokenizer=tokenizer, sparsity=args.sparsity,
                     samples=args.samples, seqlen=512)
    pruned_s = time.perf_counter() - start
    pruned = perplexity(model, windows, batch_size=4)
    print(json.dumps({"model": args.model, "device": str(device), "dtype": args.dtype,
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "recipe": f"{result.recipe.criterion} + {result.recipe.reconstruct} re-fit",
                      "sparsity": result.masks.sparsity, "calibration_windows": args.samples,
                      "dense_perplexity": round(dense.value, 3), "pruned_perplexity": round(pruned.value, 3),
                      "load_s": round(loaded, 1), "eval_s": round(evaluated, 1), "prune_s": round(pruned_s, 1)}))


if __name__ == "__main__":
    main()
