"""llama.cpp decode speed against the MLP width of a shrunk model: does a width the kernels divide evenly pay?

Every decoder layer of SmolLM2-135M keeps its first ``w`` MLP channels (quality is not measured here, only
shapes matter for speed), is written by relprune's GGUF export and quantised by ``llama-quantize``; then
``llama-bench`` (prompt 128, decode 64 tokens, 3 repetitions) with 2 and 1 threads, in rounds that alternate
the widths. Widths in pairs: an odd width next to the nearest multiple of 32, 128 or 256.

    python benchmarks/gguf_widths.py --bin /path/to/llama.cpp/build/bin --out docs/data/gguf_widths_issue29.jsonl
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from harness import append_result, done_keys, run_meta
from llama_frontier import llama_bench, quantise

WIDTHS = (1536, 1535, 1280, 1152, 1126, 1120, 1024, 1000, 896, 887, 768)


def build(args: argparse.Namespace) -> dict[int, Path]:
    import torch

    from relprune.llm import load_model
    from relprune.llm.gguf import export_gguf
    from relprune.llm.structured import save_shrunk, shrink_units

    dense, tokenizer = load_model(args.model, quiet=True)
    files = {}
    for width in args.widths:
        f16 = args.work / f"width-{width}-f16.gguf"
        if not f16.is_file():
            model = copy.deepcopy(dense)
            keep = {(i, "mlp"): torch.arange(width) for i in range(model.config.num_hidden_layers)}
            shrink_units(model, keep)
            folder = args.work / f"width-{width}"
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            save_shrunk(model, tokenizer, folder)
            export_gguf(folder, f16, overwrite=True)
        files[width] = f16
    return {w: p for w, p in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--quants", nargs="+", default=["q8_0", "q4_k_m"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/relprune-widths"))
    parser.add_argument("--out", type=Path, default=Path("docs/data/gguf_widths_issue29.jsonl"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    f16 = build(args)
    files = [(w, q, quantise(args.bin, path)[q]) for w, path in f16.items() for q in args.quants]
    done = done_keys(args.out, ("width", "gguf", "threads", "round"))
    for rnd in range(args.rounds):
        for threads in (2, 1):
            for width, q, path in files if rnd % 2 == 0 else list(reversed(files)):
                if (width, q, threads, rnd) in done:
                    continue
                tps = llama_bench(args.bin, path, threads)
                append_result(args.out, {"width": width, "gguf": q, "threads": threads, "round": rnd,
                                         "pp_tps": tps["pp"], "tg_tps": tps["tg"],
                                         "size_mib": path.stat().st_size / 2**20, **run_meta()})
                print(f"round {rnd} t{threads} width {width:5d} {q:7s} pp {tps['pp']:7.1f} tg {tps['tg']:6.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
