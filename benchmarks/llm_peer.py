"""LLM Compressor's SparseGPT and Wanda modifiers on the same model, calibration windows and evaluation.

Runs in its own virtual environment (the peer's pins must not decide ours; see ../shared/PEERS.md):

    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install -c constraints.txt llmcompressor==0.14.0.1
    /tmp/peer/bin/python benchmarks/llm_peer.py --model-folder ~/.cache/relprune/models/SmolLM2-... \\
        --modifier sparsegpt --budget 50% --out docs/data/llm_results.jsonl

The folder is the float32 one relprune converts the GGUF into (``relprune llm eval --model
smollm2-135m`` creates it). Calibration windows are drawn exactly as ``relprune.llm.calibration_windows``
draws them (same seeded generator, same tokenizer), and perplexity is computed as
``relprune.llm.perplexity`` does (non-overlapping windows, L-1 predictions each), so the numbers sit
in the same table as ours (recipe ``llmcompressor-<modifier>``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
BUDGETS = {"50%": (0.5, "0:0"), "60%": (0.6, "0:0"), "70%": (0.7, "0:0"), "2:4": (0.5, "2:4"), "4:8": (0.5, "4:8")}


def tokens(tokenizer, path: Path) -> torch.Tensor:
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False,
                    return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-folder", required=True)
    parser.add_argument("--modifier", choices=["sparsegpt", "wanda"], required=True)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="50%")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--out", default="docs/data/llm_results.jsonl")
    parser.add_argument("--ignore", default="lm_head",
                        help="the modifier's ignore pattern: 'lm_head' as PEERS.md calls it (LLM Compressor 0.14 "
                             "then still prunes the tied lm_head and so the embeddings, see "
                             "benchmarks/llmc_lm_head_probe.py), or 're:.*lm_head', which leaves it alone")
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_folder)
    calib_ids = tokens(tokenizer, DATA / "calib.txt")
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(calib_ids) - args.seqlen + 1, (args.calibration_samples,), generator=gen)
    windows = torch.stack([calib_ids[s:s + args.seqlen] for s in starts.tolist()])
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})

    sparsity, structure = BUDGETS[args.budget]
    cls = SparseGPTModifier if args.modifier == "sparsegpt" else WandaPruningModifier
    recipe = cls(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=[args.ignore])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = oneshot(model=args.model_folder, dataset=ds, num_calibration_samples=len(windows),
                        max_seq_length=args.seqlen, recipe=recipe, output_dir=tmp)
    seconds = time.perf_counter() - start

    model.eval()
    eval_ids = tokens(tokenizer, DATA / "eval.txt")
    ev = eval_ids[: args.eval_samples * args.seqlen].reshape(args.eval_samples, args.seqlen)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in ev.split(1):
            logits = model(input_ids=w, use_cache=False).logits
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                             w[:, 1:].reshape(-1), reduction="sum"))
            count += w[:, 1:].numel()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    numel = sum(m.weight.numel() for m in linears)
    row = {"model": "smollm2-135m", "criterion": f"llmcompressor-{args.modifier}", "reconstruct": None,
           "budget": args.budget, "seed": args.seed, "calibration_samples": args.calibration_samples,
           "seqlen": args.seqlen, "eval_samples": args.eval_samples, "sequential": True,
           "perplexity": math.exp(total / count), "eval_windows": len(ev), "eval_tokens": count,
           "achieved_sparsity": zeros / numel, "prune_seconds": round(seconds, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "model_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20),
           "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"),
           "peer": "llmcompressor==0.14.0.1 defaults" if args.ignore == "lm_head"
           else f"llmcompressor==0.14.0.1 ignore={args.ignore}",
           "lm_head_zeros": float((model.lm_head.weight == 0).float().mean())}
    if args.ignore != "lm_head":
        row["criterion"] += "-matched"
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
