"""Check on a real model that block-by-block calibration feeds every decoder block exactly what a dense
forward pass gives it (the relative difference of each block's input hidden state, printed per block).

    python benchmarks/block_inputs_check.py --model gemma3-270m [--tokens 256]

The test matrix (tests/llm/test_families.py) checks this on tiny models of every family; this runs it
on the real one (Gemma 3 alternates sliding-window and global layers with their own rotary tables).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from relprune.llm import calibration_windows, decoder_blocks, load_model, tokenize_file
from relprune.llm.blocks import block_outputs, capture_block_inputs, feed
from relprune.llm.text import batches_of

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, fetch=False, quiet=True)
    model.eval()
    batches = batches_of(calibration_windows(tokenize_file(tokenizer, DATA / "calib.txt"), 2, args.tokens, 0), 2)
    blocks = [b for _, b in decoder_blocks(model)]
    seen: dict[int, torch.Tensor] = {}

    def recorder(i: int):
        def hook(module, args_, kwargs):
            seen[i] = (args_[0] if args_ else kwargs["hidden_states"]).clone()
        return hook

    hooks = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(**batches[0], use_cache=False)
    for h in hooks:
        h.remove()
    captured = capture_block_inputs(model, blocks, batches)
    hidden = captured.hidden
    worst = 0.0
    for i, block in enumerate(blocks):
        diff = float((hidden[0] - seen[i]).norm() / seen[i].norm())
        worst = max(worst, diff)
        print(f"block {i:2d}: relative difference {diff:.2e}")
        hidden = block_outputs(block, feed(captured.calls[i], hidden))
    print(f"{args.model}: largest relative difference {worst:.2e} over {len(blocks)} blocks")


if __name__ == "__main__":
    main()
