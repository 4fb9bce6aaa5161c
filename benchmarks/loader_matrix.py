"""Every reader of a pruned language-model folder, on a real model: the same logits, or a refusal.

Prunes a model (default SmolLM2-135M) to 50% with Wanda's mask (a mask-only recipe, so the run is
short; the folder format does not depend on the recipe), writes it dense (the default) and compressed
(``save_format="compressed"``), and reads each folder with plain transformers - ``AutoModelForCausalLM``
and the model's own class - in a fresh process with compressed-tensors importable and with it hidden,
and with relprune's loader. Prints the largest logit difference from the pruned model in memory, or the
reader's refusal, and appends one JSON line per (folder, reader).

    python benchmarks/loader_matrix.py --out docs/data/loader_matrix_issue29.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import relprune
from relprune.llm import calibration_windows, evaluation_windows, load_causal_lm, load_model, tokenize_file
from relprune.llm.text import batches_of

READER = r"""
import sys, json, torch
if sys.argv[3] == "hidden":
    sys.modules["compressed_tensors"] = None  # as if compressed-tensors were not installed
import transformers
folder, ids, cls = sys.argv[1], torch.load(sys.argv[2]), sys.argv[4]
want = torch.load(sys.argv[5])
for name in ("AutoModelForCausalLM", cls):
    try:
        model = getattr(transformers, name).from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(input_ids=ids).logits
        print(json.dumps({"reader": name, "max_abs_logit_diff": float((got - want).abs().max())}))
    except Exception as err:
        print(json.dumps({"reader": name, "refused": f"{type(err).__name__}: {' '.join(str(err).split())[:240]}"}))
"""


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", default="../shared/data/shakespeare/calib.txt")
    parser.add_argument("--text", default="../shared/data/shakespeare/eval.txt")
    parser.add_argument("--out", help="append the results here (JSON lines)")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, quiet=True)
    windows = calibration_windows(tokenize_file(tokenizer, args.calibration), 8, 256, 0)
    relprune.llm.prune_sequential(model, batches_of(windows, 8), sparsity=0.5, criterion="wanda", reconstruct=None)
    ids = evaluation_windows(tokenize_file(tokenizer, args.text), 128, 1)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "model": args.model,
            "transformers": version("transformers"), "compressed_tensors": version("compressed-tensors"),
            "torch": torch.__version__}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, f"{tmp}/ids.pt")
        torch.save(want, f"{tmp}/want.pt")
        for layout in ("dense", "compressed"):
            folder = Path(tmp) / layout
            relprune.llm.save_pretrained(model, tokenizer, folder, save_format=layout)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            with torch.no_grad():
                ours = float((load_causal_lm(folder)(input_ids=ids).logits - want).abs().max())
            rows.append({"layout": layout, "stack": "relprune", "reader": "relprune.llm.load_causal_lm",
                         "max_abs_logit_diff": ours, "weight_bytes": size})
            stacks = ["installed", "hidden"] if meta["compressed_tensors"] else ["hidden"]
            for stack in stacks:
                run = subprocess.run([sys.executable, "-c", READER, str(folder), f"{tmp}/ids.pt", stack,
                                      type(model).__name__, f"{tmp}/want.pt"], capture_output=True, text=True,
                                     env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}, timeout=900)
                for line in run.stdout.splitlines():
                    if line.startswith("{"):
                        rows.append({"layout": layout, "stack": f"transformers, compressed-tensors {stack}",
                                     **json.loads(line), "weight_bytes": size})
                if run.returncode:
                    rows.append({"layout": layout, "stack": stack, "reader": "process", "refused": run.stderr[-300:]})
    print(f"{'layout':11} {'stack':42} {'reader':30} result")
    for row in rows:
        result = (f"max |logit diff| {row['max_abs_logit_diff']:.3g}" if "max_abs_logit_diff" in row
                  else f"refused: {row['refused'][:110]}")
        print(f"{row['layout']:11} {row['stack']:42} {row['reader']:30} {result}")
    if args.out:
        with open(args.out, "a") as fh:
            for row in rows:
                fh.write(json.dumps({**meta, **row}) + "\n")


if __name__ == "__main__":
    main()
