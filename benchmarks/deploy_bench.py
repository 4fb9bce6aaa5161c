"""What a pruned model costs where it runs: checkpoint bytes, load time and memory, and speed, dense against pruned.

    python benchmarks/deploy_bench.py lm  --out docs/data/deploy_results.jsonl   # SmolLM2-135M (~40 min)
    python benchmarks/deploy_bench.py cnn --out docs/data/deploy_results.jsonl   # ResNet-20 in ONNX Runtime
    python benchmarks/deploy_bench.py table --out docs/data/deploy_results.jsonl

``lm`` (SmolLM2-135M-Instruct, float32 folder converted from its GGUF):

* ``size``: the model pruned at 50% and 70% (unstructured) and 2:4, saved with
  ``relprune.llm.save_pretrained`` compressed and dense, in float32 and in bfloat16; bytes of the
  safetensors files, whole checkpoint and the pruned tensors alone. Which weights are kept does not
  change the bytes, only the pattern and the dtype do, so the masks come from Wanda on 8 calibration
  windows of 512 tokens (fast); the quality of each recipe is the language-model benchmark's business.
* ``load``: the dense and the compressed float32 folder loaded with ``relprune.llm.load_causal_lm`` in
  a fresh process each, alternately, ``--rounds`` times; median seconds and the process's peak
  resident memory (ru_maxrss).
* ``speed``: prefill of 8 x 512 tokens and greedy decode of 128 new tokens at batch 1 in plain
  transformers (eager, float32, torch's default threads), the dense model and each pruned one timed
  alternately in one process, ``--rounds`` rounds, ratio of medians. Pruned models: 50% unstructured
  (no sparse kernels: the zeros are multiplied) and the structured shrinks of ``relprune llm shrink``
  (FLAP's score and compensation, uniform sizes) at 20%, 30% and 50% of the decoder projections'
  parameters. ``macs_ratio`` is dense over pruned multiply-accumulates per token of every Linear,
  the output head included (attention over the context left out: at most 4% here).

``llamacpp``: the dense and the 30%-shrunk SmolLM2 converted to float32 GGUF files with llama.cpp's
``convert_hf_to_gguf.py`` and timed by its ``llama-bench`` (prompt of 512 tokens, 128 generated, interleaved,
``--rounds`` repetitions each); needs a llama.cpp tree built with ``cmake --build build --target llama-bench``
(the one vendored in the ``llama-cpp-python`` sdist builds here in about 8 minutes on two cores).

``cnn``: ResNet-20 on Fashion-MNIST (the structured benchmark's dense net; ``--epochs`` of training,
cached in --work) shrunk to half its MACs over our graph (``rc``) and by Torch-Pruning's MetaPruner
(group L1) at the same or fewer MACs, exported to ONNX (``relprune.export.export_onnx``) and run in
ONNX Runtime (CPU, default threads) at batch 1 and 64, dense and pruned alternately; also PyTorch
eager for reference. ``--round-to 8`` keeps every layer's channel count a multiple of 8 (both
libraries), the widths ONNX Runtime's blocked convolution kernels need.

One JSON line per measurement; the machine, torch version and date are recorded in each.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "shakespeare"


def _write(out: Path, row: dict) -> None:
    row = {**row, "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _pruned_bytes(folder: Path, prefixes: set[str]) -> int:
    """Bytes of the pruned weights alone (their compressed parts, or the dense tensors)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no iterator
                stem = key.rsplit(".", 1)[0]
                if stem in prefixes:
                    t = fh.get_slice(key)
                    total += _numel(t.get_shape()) * _itemsize(t.get_dtype())
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "I32": 4, "BOOL": 1}[dtype]


def linear_macs(model) -> int:
    """Multiply-accumulates per token of every Linear, the output head included."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


# -- language model ------------------------------------------------------------------------------
def _smollm2():
    from relprune.llm import load_model

    return load_model("smollm2-135m", quiet=True)


def _calibration(tokenizer, samples: int, seed: int = 0):
    from relprune.llm import calibration_windows, tokenize_file
    from relprune.llm.text import batches_of

    return batches_of(calibration_windows(tokenize_file(tokenizer, DATA / "calib.txt"), samples, 512, seed), 8)


PATTERNS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"n_m": "2:4"}}


def run_size_and_load(args) -> None:
    from relprune.llm import prune_sequential, save_pretrained

    out = Path(args.out)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for label, budget in PATTERNS.items():
            model, tokenizer = _smollm2()
            masks = prune_sequential(model, _calibration(tokenizer, 8), criterion="wanda", reconstruct=False, **budget)
            prefixes = {n.removesuffix(".weight") for n in masks}
            n_m = (2, 4) if "n_m" in budget else None
            folders = {}
            for dtype in (torch.float32, torch.bfloat16):
                model.to(dtype)
                for fmt in ("dense", "compressed"):
                    folder = Path(tmp) / f"{label.replace(':', 'of').replace('%', '')}-{str(dtype)[6:]}-{fmt}"
                    save_pretrained(model, tokenizer, folder, save_format=fmt, n_m=n_m)
                    folders[(dtype, fmt)] = folder
                dense, comp = folders[(dtype, "dense")], folders[(dtype, "compressed")]
                _write(out, {"part": "lm-size", "pattern": label, "dtype": str(dtype)[6:],
                             "dense_bytes": _bytes(dense), "compressed_bytes": _bytes(comp),
                             "ratio": _bytes(comp) / _bytes(dense),
                             "pruned_dense_bytes": _pruned_bytes(dense, prefixes),
                             "pruned_compressed_bytes": _pruned_bytes(comp, prefixes),
                             "pruned_ratio": _pruned_bytes(comp, prefixes) / _pruned_bytes(dense, prefixes),
                             "achieved_sparsity": masks.sparsity})
            if label == "50%" and args.loads:
                _measure_loads(out, label, folders[(torch.float32, "dense")], folders[(torch.float32, "compressed")],
                               args.rounds)
            del model


LOADER = r"""
import sys, time
import torch
def hwm():  # this process's own peak resident memory in KiB (ru_maxrss can carry the parent's across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
t = time.perf_counter()
from relprune.llm import load_causal_lm
model = load_causal_lm(sys.argv[1])
seconds, loaded = time.perf_counter() - t, hwm()
with torch.no_grad():
    model(input_ids=torch.ones(1, 16, dtype=torch.long))
print(seconds, loaded, hwm())
"""


def _measure_loads(out: Path, label: str, dense: Path, compressed: Path, rounds: int) -> None:
    """Each folder loaded in a fresh process, alternately; median seconds and peak resident memory."""
    seen: dict[str, list[tuple[float, int, int]]] = {"dense": [], "compressed": []}
    for _ in range(rounds):
        for kind, folder in (("dense", dense), ("compressed", compressed)):
            done = subprocess.run([sys.executable, "-c", LOADER, str(folder)], capture_output=True, text=True,
                                  check=True)
            seconds, loaded_kib, used_kib = done.stdout.split()[-3:]
            seen[kind].append((float(seconds), int(loaded_kib), int(used_kib)))
    row = {"part": "lm-load", "pattern": label, "dtype": "float32", "rounds": rounds}
    for kind, values in seen.items():
        row[f"{kind}_seconds"] = statistics.median(v[0] for v in values)
        row[f"{kind}_peak_mib"] = statistics.median(v[1] for v in values) / 1024
        row[f"{kind}_peak_after_forward_mib"] = statistics.median(v[2] for v in values) / 1024
    row["seconds_ratio"] = row["compressed_seconds"] / row["dense_seconds"]
    row["peak_ratio"] = row["compressed_peak_mib"] / row["dense_peak_mib"]
    row["peak_after_forward_ratio"] = row["compressed_peak_after_forward_mib"] / row["dense_peak_after_forward_mib"]
    _write(out, row)


def _prefill(model, ids) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t


def _decode(model, prompt, new_tokens: int) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - t


def shrunk(ratio: float, seed: int = 0, compensation: bool = True):
    """SmolLM2 shrunk with FLAP's score, uniform sizes (the shapes ``relprune llm shrink`` gives), with FLAP's
    compensation or none; the speed depends on the shapes only."""
    from relprune.llm.structured import plan_units, shrink_units, unit_compensation, unit_scores

    model, tokenizer = _smollm2()
    batches = _calibration(tokenizer, 16, seed)
    keep = plan_units(model, unit_scores(model, batches, "fluctuation", seed=seed), ratio, scope="uniform")
    shrink_units(model, keep, bias_delta=unit_compensation(model, batches, keep) if compensation else None)
    return model.eval()


def run_speed(args) -> None:
    from relprune.llm import prune_sequential, tokenize_file

    out = Path(args.out)
    dense, tokenizer = _smollm2()
    ids = tokenize_file(tokenizer, DATA / "eval.txt")
    batch = ids[: 8 * 512].reshape(8, 512)
    prompt = ids[:32].reshape(1, 32)
    candidates = {}
    model, _ = _smollm2()
    prune_sequential(model, _calibration(tokenizer, 8), sparsity=0.5, criterion="wanda", reconstruct=False)
    candidates["50% unstructured"] = model.eval()
    for ratio in args.structured:
        candidates[f"structured {ratio:.0%}"] = shrunk(ratio)
    dense_macs = linear_macs(dense)
    for label, model in candidates.items():
        times: dict[str, list[float]] = {"dense_prefill": [], "pruned_prefill": [], "dense_decode": [],
                                         "pruned_decode": []}
        for warm in (dense, model):
            _prefill(warm, batch[:1, :64])
        for _ in range(args.rounds):
            times["dense_prefill"].append(_prefill(dense, batch))
            times["pruned_prefill"].append(_prefill(model, batch))
            times["dense_decode"].append(_decode(dense, prompt, args.new_tokens))
            times["pruned_decode"].append(_decode(model, prompt, args.new_tokens))
        med = {k: statistics.median(v) for k, v in times.items()}
        _write(out, {"part": "lm-speed", "model": label, "rounds": args.rounds, "prefill_tokens": "8x512",
                     "decode_tokens": args.new_tokens,
                     "macs_ratio": dense_macs / linear_macs(model),
                     "dense_prefill_s": med["dense_prefill"], "pruned_prefill_s": med["pruned_prefill"],
                     "prefill_speedup": med["dense_prefill"] / med["pruned_prefill"],
                     "dense_decode_tok_s": args.new_tokens / med["dense_decode"],
                     "pruned_decode_tok_s": args.new_tokens / med["pruned_decode"],
                     "decode_speedup": med["dense_decode"] / med["pruned_decode"],
                     "params": sum(p.numel() for p in model.parameters())})


def run_llamacpp(args) -> None:
    """Dense and 30%-shrunk SmolLM2 as float32 GGUF files, timed by llama.cpp's own llama-bench, interleaved."""
    from relprune.llm import load_model
    from relprune.llm.load import resolve_model
    from relprune.llm.structured import save_shrunk

    source = Path(args.llama_cpp)
    bench, convert = source / "build" / "bin" / "llama-bench", source / "convert_hf_to_gguf.py"
    if not bench.is_file() or not convert.is_file():
        raise SystemExit(f"--llama-cpp {source}: needs build/bin/llama-bench (cmake --build build --target "
                         "llama-bench) and convert_hf_to_gguf.py")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        model = shrunk(0.3, compensation=False)  # the shapes decide the speed; no biases llama.cpp's Llama lacks
        _, tokenizer = load_model("smollm2-135m", quiet=True, device="cpu")
        save_shrunk(model, tokenizer, Path(tmp) / "shrunk")
        files = {}
        for label, folder in (("dense", Path(resolve_model("smollm2-135m"))), ("structured 30%", Path(tmp) / "shrunk")):
            files[label] = Path(tmp) / f"{label.split()[0]}.gguf"
            subprocess.run([sys.executable, str(convert), str(folder), "--outfile", str(files[label]), "--outtype",
                            "f32"], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(
                                source / "gguf-py")})
        models = [str(files["dense"]), str(files["structured 30%"])] * 2
        done = subprocess.run([str(bench), *(a for m in models for a in ("-m", m)), "-p", "512", "-n", "128", "-r",
                               str(args.rounds), "-t", str(torch.get_num_threads()), "-o", "jsonl"],
                              check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        for r in rows:
            label = "dense" if r["model_filename"] == str(files["dense"]) else "structured 30%"
            _write(out, {"part": "llamacpp", "model": label, "n_prompt": r["n_prompt"], "n_gen": r["n_gen"],
                         "tokens_per_s": r["avg_ts"], "stddev": r["stddev_ts"], "params": r["model_n_params"],
                         "bytes": r["model_size"], "llama_cpp": r.get("build_commit"), "threads": r.get("n_threads")})


# -- vision ----------------------------------------------------------------------------------------
def run_cnn(args) -> None:
    import onnxruntime as ort

    from relprune.deploy.export import export_onnx
    from structured_bench import _cnn_setup, pruned_cnns

    out = Path(args.out)
    ns = argparse.Namespace(epochs=args.epochs, dense_seed=0, seed=0, work=args.work, methods=["rc", "tp-l1"],
                            round_to=1)
    data, dense, _, example, (macs0, _), calib, stats = _cnn_setup(ns)
    cells = []
    for round_to in args.round_to:  # ONNX Runtime's fast convolutions want channel counts in multiples of 8
        ns.round_to = round_to
        cells += [c for c in pruned_cnns(ns, dense, example, macs0, calib, stats) if c[0] == 0.5]
    shape = data.input_shape
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:

        def session(name, model):
            path = export_onnx(model, example, Path(tmp) / name)
            made = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            x = torch.randn(4, *shape)
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(_ort_run(made, x.numpy())), model.eval()(x),
                                           rtol=1e-3, atol=1e-4)
            return made

        dense_s = session("dense", dense)
        for target, method, model, macs, _, _, _ in cells:
            pruned_s = session(method.replace(" ", "-"), model)
            row = {"part": "cnn-onnx", "method": method, "target": target, "macs_ratio": macs / macs0,
                   "rounds": args.rounds, "onnxruntime": ort.__version__}
            for batch in (1, 64):
                x = torch.randn(batch, *shape)
                calls = 50 if batch == 1 else 10
                timed = {"ort_dense": [], "ort_pruned": [], "eager_dense": [], "eager_pruned": []}
                for _ in range(args.rounds):
                    timed["ort_dense"].append(_median_call(functools.partial(_ort_run, dense_s, x.numpy()), calls))
                    timed["ort_pruned"].append(_median_call(functools.partial(_ort_run, pruned_s, x.numpy()), calls))
                    timed["eager_dense"].append(_median_call(functools.partial(_eager, dense, x), calls))
                    timed["eager_pruned"].append(_median_call(functools.partial(_eager, model, x), calls))
                med = {k: statistics.median(v) for k, v in timed.items()}
                row[f"ort_dense_b{batch}_ms"] = med["ort_dense"] * 1e3
                row[f"ort_pruned_b{batch}_ms"] = med["ort_pruned"] * 1e3
                row[f"ort_ratio_b{batch}"] = med["ort_pruned"] / med["ort_dense"]
                row[f"eager_ratio_b{batch}"] = med["eager_pruned"] / med["eager_dense"]
            _write(out, row)


def _ort_run(session, x):
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _eager(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _median_call(step, calls: int) -> float:
    from timing import median_seconds

    return median_seconds(step, calls, warmup=3)


# -- the table -------------------------------------------------------------------------------------
def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = []
    size = [r for r in rows if r["part"] == "lm-size"]
    if size:
        lines += ["| pattern | dtype | dense MB | compressed MB | ratio (whole checkpoint) | ratio (pruned tensors) |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['pattern']} | {r['dtype']} | {r['dense_bytes'] / 1e6:.1f} | "
                  f"{r['compressed_bytes'] / 1e6:.1f} | {r['ratio']:.3f} | {r['pruned_ratio']:.3f} |" for r in size]
        lines.append("")
    for r in (r for r in rows if r["part"] == "lm-load"):
        lines.append(f"Load ({r['pattern']}, {r['dtype']}, median of {r['rounds']}): dense {r['dense_seconds']:.2f} s, "
                     f"{r['dense_peak_mib']:.0f} MiB peak ({r['dense_peak_after_forward_mib']:.0f} after a forward); "
                     f"compressed {r['compressed_seconds']:.2f} s, {r['compressed_peak_mib']:.0f} MiB peak "
                     f"({r['compressed_peak_after_forward_mib']:.0f}) (ratios {r['seconds_ratio']:.2f}, "
                     f"{r['peak_ratio']:.2f} and {r['peak_after_forward_ratio']:.2f}).")
        lines.append("")
    speed = [r for r in rows if r["part"] == "lm-speed"]
    if speed:
        lines += ["| model | params | MACs ratio (dense / pruned) | prefill speedup | decode tok/s dense | "
                  "decode tok/s pruned | decode speedup | speedup / MACs ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['macs_ratio']:.2f} | {r['prefill_speedup']:.2f} | "
                  f"{r['dense_decode_tok_s']:.1f} | {r['pruned_decode_tok_s']:.1f} | {r['decode_speedup']:.2f} | "
                  f"{r['decode_speedup'] / r['macs_ratio']:.2f} |" for r in speed]
        lines.append("")
    cpp = [r for r in rows if r["part"] == "llamacpp"]
    if cpp:
        lines += ["| llama.cpp | prompt | generated | tokens/s (mean +- sd over runs) |", "|---|---:|---:|---|"]
        for r in cpp:
            lines.append(f"| {r['model']} | {r['n_prompt']} | {r['n_gen']} | "
                         f"{r['tokens_per_s']:.1f} +- {r['stddev']:.1f} |")
        lines.append("")
    cnn = [r for r in rows if r["part"] == "cnn-onnx"]
    if cnn:
        lines += ["| method | MACs ratio | ORT b1 ratio | ORT b64 ratio | eager b1 ratio | eager b64 ratio | "
                  "ORT dense b1 / b64 ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['macs_ratio']:.3f} | {r['ort_ratio_b1']:.2f} | {r['ort_ratio_b64']:.2f} | "
                  f"{r['eager_ratio_b1']:.2f} | {r['eager_ratio_b64']:.2f} | "
                  f"{r['ort_dense_b1_ms']:.2f} / {r['ort_dense_b64_ms']:.1f} |" for r in cnn]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["lm", "lm-size", "lm-speed", "llamacpp", "cnn", "table"])
    parser.add_argument("--llama-cpp", help="a llama.cpp source tree with build/bin/llama-bench (llamacpp)")
    parser.add_argument("--out", default="docs/data/deploy_results.jsonl")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "relprune" / "structured_bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-loads", dest="loads", action="store_false", help="skip the load measurements")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--structured", type=float, nargs="*", default=[0.2, 0.3, 0.5])
    parser.add_argument("--epochs", type=int, default=15, help="the dense ResNet-20's training epochs (cnn)")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8],
                        help="channel counts kept in multiples of these (cnn; 1: any)")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.part in ("lm", "lm-size"):
        run_size_and_load(args)
    if args.part in ("lm", "lm-speed"):
        run_speed(args)
    if args.part == "cnn":
        run_cnn(args)
    if args.part == "llamacpp":
        run_llamacpp(args)
    if args.part == "table":
        print(table(Path(args.out)))


if __name__ == "__main__":
    main()
