"""Does the ecosystem read our compressed folders? Logits from another stack's loader against ours.

relprune's compressed folders (``save_format="compressed"``) store pruned weights in compressed-tensors' sparse
layouts. Since issue 29 they are marked so that only relprune reads them (a model type naming its reader, weights
not called model.safetensors), so another stack is expected to refuse them; this script records what it does.
transformers 5 cannot decompress the layouts (it needs compressed-tensors >= 0.15, which dropped the sparse
compressors); the last stack that could is transformers 4.x with compressed-tensors <= 0.14. This script writes pruned
folders with relprune (tiny Llama models, or ``--folder`` one already written, e.g. by
``relprune llm prune``), loads each with relprune and, in the peer interpreter ``--peer-python``
(a virtual environment holding that stack; it never imports relprune), with plain
``AutoModelForCausalLM.from_pretrained``, and prints the largest logit difference.

    python -m venv peer && peer/bin/pip install -c constraints.txt torch==2.13.0 'transformers<5' \\
        compressed-tensors==0.14.0.1 psutil accelerate
    python benchmarks/compressed_interop.py --peer-python peer/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PEER = r"""
import json, sys, torch, transformers, compressed_tensors
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.config import SparsityCompressionConfig
folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
result = {"peer": f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}"}
try:  # the user's path: plain from_pretrained
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/peer_from_pretrained.pt")
    result["from_pretrained"] = "loaded"
except Exception as err:
    result["from_pretrained"] = f"{type(err).__name__}: {str(err)[:160]}"
# compressed-tensors' own sparse decompressor, into a model built from the config without its quantization block
try:
    config = transformers.AutoConfig.from_pretrained(folder)
    sparsity = config.quantization_config["sparsity_config"]
    layout = SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity)
    compressor = BaseCompressor.load_from_registry(sparsity["format"], config=layout)
    state = dict(compressor.decompress(folder))
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    missing = model.load_state_dict(state, strict=False)
    model.tie_weights()
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/peer_decompress.pt")
    result["decompress_missing"] = [k for k in missing.missing_keys if k != "lm_head.weight"]
except Exception as err:
    result["decompress"] = f"{type(err).__name__}: {str(err)[:160]}"
print(json.dumps(result))
"""


def tiny_pruned(folder: Path, n_m: tuple[int, int] | None, seed: int) -> None:
    """A tiny Llama with its decoder Linears pruned (50% random or 2:4 by magnitude), saved compressed."""
    import transformers

    from relprune.llm.save import save_pretrained

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                w = module.weight
                if n_m is None:
                    w.mul_(torch.rand_like(w) > 0.5)
                else:
                    groups = w.abs().reshape(w.shape[0], -1, 4)
                    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
                    w.mul_(keep.reshape(w.shape))
    save_pretrained(model, None, folder, n_m=n_m, save_format="compressed")


def compare(folder: Path, peer_python: str, seed: int) -> dict:
    import transformers

    from relprune.llm.compressed import folder_layout, load_compressed
    from relprune.llm.load import load_config

    model = load_compressed(folder, load_config(folder), transformers)
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours = model(ids).logits
    done = subprocess.run([peer_python, "-c", PEER, str(folder), json.dumps(ids.tolist())],
                          capture_output=True, text=True)
    layout = folder_layout(json.loads((folder / "config.json").read_text()))
    if done.returncode:
        return {"folder": str(folder), "layout": layout, "peer": "failed", "error": done.stderr.strip()[-400:]}
    row = {"folder": str(folder), "layout": layout, **json.loads(done.stdout.strip().splitlines()[-1])}
    for path in ("from_pretrained", "decompress"):
        file = folder / f"peer_{path}.pt"
        if file.is_file():
            row[f"{path}_max_abs_logit_diff"] = float((torch.load(file) - ours).abs().max())
            file.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True, help="interpreter of the peer stack")
    parser.add_argument("--folder", type=Path, action="append", default=[],
                        help="an already written compressed folder (repeatable); default: tiny models")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = list(args.folder)
        if not folders:
            for label, n_m in (("unstructured", None), ("2of4", (2, 4))):
                tiny_pruned(Path(tmp) / label, n_m, args.seed)
                folders.append(Path(tmp) / label)
        for folder in folders:
            print(json.dumps(compare(folder, args.peer_python, args.seed)))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
