"""llama.cpp's logits for relprune's GGUF files against torch's, on a real model: the dense model, a uniform
shrink and a per-layer shrink (llama.cpp's ``deci`` graph), each at F16.

For each model: the logits of the first ``--tokens`` tokens of the evaluation text, from torch in float32 with
the weights rounded to F16 (the file's rounding), and from llama.cpp (through llama-cpp-python, built from its
sdist; ``LLAMA_CPP_LIB_PATH`` may name a llama.cpp build's ``bin``). Printed and appended per model: the largest
and mean absolute logit difference, the top-1 agreement and the mean KL(torch || llama.cpp). The dense model's
row is the reference for "within F16 rounding": llama.cpp computes F16 products its own way, so a shrunk file
matches when its differences are of the dense file's size.

    LLAMA_CPP_LIB_PATH=/path/to/llama.cpp/build/bin \\
    python benchmarks/gguf_equivalence.py --out docs/data/gguf_equivalence_issue29.jsonl
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness import append_result, run_meta
from relprune.defaults import DEFAULT_LLM_UNIT_SCORE
from relprune.llm import calibration_windows, load_model, tokenize_file
from relprune.llm.gguf import LLAMA_CPP_PYTHON_VERSION, converter_dir, export_gguf
from relprune.llm.load import resolve_model
from relprune.llm.structured import plan_units, save_shrunk, shrink_refit, unit_scores
from relprune.llm.text import batches_of

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    model = llama_cpp.Llama(str(path), n_ctx=max(len(ids), 64), logits_all=True, verbose=False, n_threads=2)
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float64)


def torch_logits(model, ids: list[int]) -> np.ndarray:
    rounded = copy.deepcopy(model).float()
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:  # matrices are F16 in the file; norms stay F32
                p.copy_(p.half().float())
        return rounded(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    pa = torch.log_softmax(torch.from_numpy(a), -1)
    pb = torch.log_softmax(torch.from_numpy(b), -1)
    return {"max_abs": float(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean()),
            "logit_scale": float(np.abs(a).max()), "top1_agree": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "kl": float((pa.exp() * (pa - pb)).sum(-1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tree = converter_dir(fetch=True)
    dense, tokenizer = load_model(args.model, quiet=True)
    ids = tokenize_file(tokenizer, DATA / "eval.txt")[: args.tokens].tolist()
    batches = batches_of(calibration_windows(tokenize_file(tokenizer, DATA / "calib.txt"), args.calibration_samples,
                                             args.seqlen, 0), 4)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("dense", dense, Path(resolve_model(args.model)))]
        for scope in ("uniform", "global"):
            model = copy.deepcopy(dense)
            keep = plan_units(model, unit_scores(model, batches, DEFAULT_LLM_UNIT_SCORE), args.ratio, scope=scope)
            sizes = shrink_refit(model, batches, keep)
            folder = Path(tmp) / scope
            save_shrunk(model, tokenizer, folder)
            cases.append((f"shrunk {scope} {args.ratio:g}", model, folder, sizes))
        for name, model, folder, *sizes in cases:
            path = export_gguf(folder, Path(tmp) / f"{name.replace(' ', '_')}.gguf", llama_cpp=tree)
            row = {"model": args.model, "case": name, "tokens": len(ids), "gguf": "f16",
                   "per_layer_sizes": sizes[0]["layers"] if sizes else None,
                   **compare(torch_logits(model, ids), llama_cpp_logits(path, ids)),
                   "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, **run_meta()}
            print(f"{name:22s} max|dlogit| {row['max_abs']:.4f} (scale {row['logit_scale']:.1f})  mean "
                  f"{row['mean_abs']:.5f}  top-1 {row['top1_agree']:.3f}  KL {row['kl']:.2e}", flush=True)
            append_result(args.out, row)


if __name__ == "__main__":
    main()
