"""Output error of one SmolLM2 layer after pruning, without and with each re-fit of the kept weights.

    python benchmarks/refit_error.py [--blocks 0 5] [--calibration-samples 8]

For each layer: the mask is Wanda's at 50% per row; the error is tr((W' - W) H (W' - W)^T) with
H = E[x x^T] over the calibration tokens (the summed mean squared output error of the layer), for
the masked weights, SparseGPT's fixed-mask sweep ("obs") and the exact least-squares re-fit after
10, 25, 50 and 100 conjugate-gradient iterations, with the seconds each took.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--layers", nargs="+", default=["self_attn.q_proj", "mlp.down_proj"])
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import relprune
    from relprune.core.reconstruct import refit
    from relprune.llm import calibration_windows, decoder_blocks, load_model, tokenize_file
    from relprune.llm.blocks import block_outputs, capture_block_inputs, feed
    from relprune.llm.text import batches_of

    model, tokenizer = load_model("smollm2-135m", fetch=False, quiet=True)
    windows = calibration_windows(tokenize_file(tokenizer, DATA / "calib.txt"), args.calibration_samples,
                                  args.seqlen, 0)
    blocks = decoder_blocks(model)
    captured = capture_block_inputs(model, [b for _, b in blocks], batches_of(windows, 8))
    hidden = captured.hidden
    print(f"# refit_error  {args.calibration_samples}x{args.seqlen} calibration tokens, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}")
    print("| block | layer | masked | obs (s) | exact 10 it (s) | 25 it (s) | 50 it (s) | 100 it (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for index, (_, block) in enumerate(blocks[: max(args.blocks) + 1]):
        inputs = feed(captured.calls[index], hidden)
        if index in args.blocks:
            stats = relprune.collect_stats(block, inputs, statistics=["input_gram", "input_sq_mean"],
                                           liveness=False)
            modules = dict(block.named_modules())
            for name in args.layers:
                w = modules[name].weight.detach()
                h = stats[name].input_gram.float()
                score = w.abs() * stats[name].input_sq_mean.float().sqrt()
                keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.topk(w.shape[1] // 2, 1).indices,
                                                                      True)

                def error(new: torch.Tensor, h=h, w=w) -> float:
                    d = new - w
                    return float((d @ h * d).sum())

                cells = [f"{error(w * keep):.2f}"]
                start = time.perf_counter()
                cells.append(f"{error(refit(w, h, keep, method='obs')):.2f} ({time.perf_counter() - start:.1f})")
                for iters in (10, 25, 50, 100):
                    start = time.perf_counter()
                    new = refit(w, h, keep, max_iter=iters, tol=0.0)
                    cells.append(f"{error(new):.2f} ({time.perf_counter() - start:.1f})")
                print(f"| {index} | {name} | " + " | ".join(cells) + " |", flush=True)
        hidden = block_outputs(block, inputs)


if __name__ == "__main__":
    main()
