"""The llama.cpp speed/quality frontier of shrunk models against the dense model's quantisation ladder.

Points: the dense model and structured shrinks (``--ratios`` of the decoder's attention and MLP parameters;
uniform, per-layer and joint (blocks and widths) plans; FLAP's fluctuation score with relprune's least-squares
re-fit, as ``relprune llm shrink`` does by default), some also after recovery (``relprune llm recover`` on the
calibration text), each written by relprune's GGUF export at F16 and quantised by llama.cpp's ``llama-quantize``
to Q8_0, Q5_K_M and Q4_K_M. For every file: llama.cpp's own ``llama-perplexity`` (context 512, the first
``--chunks`` chunks) on the Shakespeare evaluation text and on the second-domain text (Botchan), and
``llama-bench`` prompt (pp) and decode (tg) tokens/s with the default threads and one thread, in rounds that
alternate the files. The recovery stage also records torch perplexity (16 windows of 512 tokens, the project's
protocol) after each token budget.

Stages (each appends to ``--out`` and skips what it holds): build, recovery, quality, speed; then report
(the table and the frontier) and plot. Model files go to ``--work``, never into the repository.

    B=/path/to/llama.cpp/build/bin
    python benchmarks/llama_frontier.py --stage build --bin $B
    python benchmarks/llama_frontier.py --stage recovery --bin $B
    python benchmarks/llama_frontier.py --stage quality --bin $B
    python benchmarks/llama_frontier.py --stage speed --bin $B      # on an idle machine
    python benchmarks/llama_frontier.py --stage report --plot docs/img/llama_frontier.png
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import time
from pathlib import Path

from harness import append_result, run_meta

OUT = Path("docs/data/llama_frontier_issue29.jsonl")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
QUANTS = ("f16", "q8_0", "q5_k_m", "q4_k_m")


def rows(out: Path, stage: str) -> list[dict]:
    if not out.is_file():
        return []
    return [r for r in map(json.loads, out.read_text().splitlines()) if r.get("stage") == stage]


def quantise(bin_dir: Path, f16: Path) -> dict[str, Path]:
    files = {"f16": f16}
    for q in QUANTS[1:]:
        target = f16.with_name(f16.name.replace("-f16.gguf", f"-{q}.gguf"))
        if not target.is_file():
            done = subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(target), q.upper()],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"llama-quantize {q}: {done.stderr[-300:]}")
        files[q] = target
    return files


def build(args: argparse.Namespace) -> None:
    import torch  # noqa: F401 - loaded before transformers, as the library does

    from relprune.defaults import DEFAULT_LLM_JOINT_SCORE, DEFAULT_LLM_UNIT_SCORE
    from relprune.llm import calibration_windows, load_model, tokenize_file
    from relprune.llm.gguf import export_gguf
    from relprune.llm.joint import plan_joint, residual_shares, shrink_joint
    from relprune.llm.load import resolve_model
    from relprune.llm.structured import plan_units, save_shrunk, shrink_refit, unit_scores
    from relprune.llm.text import batches_of

    done = {r["point"] for r in rows(args.out, "build")}
    dense, tokenizer = load_model(args.model, quiet=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if "dense" not in done:
        f16 = export_gguf(resolve_model(args.model), args.work / "dense-f16.gguf", overwrite=True)
        quantise(args.bin, f16)
        append_result(args.out, {"stage": "build", "point": "dense", "ratio": 0.0, "scope": None,
                                 "parameters": sum(p.numel() for p in dense.parameters()), **run_meta()})
    batches = None
    for ratio in args.ratios:
        for scope in args.scopes:
            point = f"{scope}-{ratio:g}" + (f"-r{args.round_to}" if args.round_to != 1 else "")
            if point in done:
                continue
            if batches is None:
                ids = tokenize_file(tokenizer, DATA / "calib.txt")
                batches = batches_of(calibration_windows(ids, args.calibration_samples, 512, 0), 8)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            # What `relprune llm shrink --scope SCOPE` does by default.
            score = DEFAULT_LLM_JOINT_SCORE if scope == "joint" else DEFAULT_LLM_UNIT_SCORE
            scores = unit_scores(model, batches, score)
            if scope == "joint":
                plan = plan_joint(model, scores, residual_shares(model, batches), ratio, round_to=args.round_to)
                sizes = shrink_joint(model, batches, plan)
            else:
                sizes = shrink_refit(model, batches, plan_units(model, scores, ratio, scope=scope,
                                                                round_to=args.round_to))
            seconds = time.perf_counter() - start
            folder = args.work / point
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            save_shrunk(model, tokenizer, folder)
            quantise(args.bin, export_gguf(folder, args.work / f"{point}-f16.gguf", overwrite=True))
            append_result(args.out, {"stage": "build", "point": point, "ratio": ratio, "scope": scope, "score": score,
                                     "round_to": args.round_to,
                                     "parameters": sum(p.numel() for p in model.parameters()),
                                     "shrink_seconds": round(seconds, 1), "sizes": sizes, **run_meta()})
            print(f"built {point} in {seconds:.0f} s", flush=True)


def recovery(args: argparse.Namespace) -> None:
    from relprune.llm import evaluation_windows, load_model, perplexity, tokenize_file
    from relprune.llm.gguf import export_gguf
    from relprune.llm.known import known_text
    from relprune.llm.recover import RecoverConfig, TextWindows, recover
    from relprune.llm.structured import load_shrunk, save_shrunk

    teacher, tokenizer = load_model(args.model, quiet=True)
    ids = tokenize_file(tokenizer, DATA / "calib.txt")
    evals = {"eval": evaluation_windows(tokenize_file(tokenizer, DATA / "eval.txt"), 512, 16),
             "botchan": evaluation_windows(tokenize_file(tokenizer, known_text("botchan")), 512, 16)}
    done = {(r["point"], r["tokens"]) for r in rows(args.out, "recovery")}
    for point in args.recover:
        student = load_shrunk(args.work / point)
        checkpoint = args.work / f"{point}-recover-state"
        checkpoint.mkdir(exist_ok=True)
        for budget in [0, *args.budgets]:
            if (point, budget) in done:
                continue
            seconds = 0.0
            if budget:
                cfg = RecoverConfig(tokens=budget, seqlen=256, batch_size=8, lr=args.lr, checkpoint_seconds=300)
                report = recover(student, teacher, TextWindows(ids, cfg), cfg, checkpoint=checkpoint)
                seconds = report.seconds
            elif any(p == point for p, _ in done):
                continue
            ppl = {k: perplexity(student, w, batch_size=4).value for k, w in evals.items()}
            append_result(args.out, {"stage": "recovery", "point": point, "tokens": budget, "lr": args.lr,
                                     "seconds": round(seconds, 1), "ppl_torch_eval": ppl["eval"],
                                     "ppl_torch_botchan": ppl["botchan"], **run_meta()})
            print(f"{point} after {budget:,} tokens ({seconds:.0f} s): eval {ppl['eval']:.2f}, botchan "
                  f"{ppl['botchan']:.2f}", flush=True)
        folder = args.work / f"{point}-rec"
        if not (args.work / f"{point}-rec-f16.gguf").is_file():
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            save_shrunk(student, tokenizer, folder)
            quantise(args.bin, export_gguf(folder, args.work / f"{point}-rec-f16.gguf", overwrite=True))


def gguf_points(args: argparse.Namespace) -> list[tuple[str, str, Path]]:
    """(point, type, file) of every GGUF file in ``--work`` (only ``--points`` and ``--quants`` when given)."""
    found = []
    for q in QUANTS:
        if q not in args.quants:
            continue
        for path in sorted(args.work.glob(f"*-{q}.gguf")):
            point = path.name.removesuffix(f"-{q}.gguf")
            if not args.points or point in args.points:
                found.append((point, q, path))
    return sorted(found, key=lambda t: (t[0], QUANTS.index(t[1])))


def quality(args: argparse.Namespace) -> None:
    from relprune.llm.known import known_text

    texts = {"eval": DATA / "eval.txt", "botchan": known_text("botchan")}
    done = {(r["point"], r["gguf"]) for r in rows(args.out, "quality") if r["chunks"] == args.chunks}
    for point, q, path in gguf_points(args):
        if (point, q) in done:
            continue
        ppl = {}
        for name, text in texts.items():
            done_run = subprocess.run([str(args.bin / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c",
                                       "512", "--chunks", str(args.chunks), "-t", "2"], capture_output=True, text=True)
            found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", done_run.stdout + done_run.stderr)
            if not found:
                raise SystemExit(f"llama-perplexity on {path.name}: {(done_run.stderr or '')[-300:]}")
            ppl[name] = (float(found.group(1)), float(found.group(2)))
        append_result(args.out, {"stage": "quality", "point": point, "gguf": q, "size_mib": path.stat().st_size / 2**20,
                                 "ppl_eval": ppl["eval"][0], "ppl_eval_err": ppl["eval"][1],
                                 "ppl_botchan": ppl["botchan"][0], "ppl_botchan_err": ppl["botchan"][1],
                                 "chunks": args.chunks, **run_meta()})
        print(f"{point:16s} {q:7s} eval {ppl['eval'][0]:7.2f}  botchan {ppl['botchan'][0]:7.2f}", flush=True)


def llama_bench(bin_dir: Path, path: Path, threads: int) -> dict[str, float]:
    """``llama-bench`` on one file: prompt-processing (``pp``, 128 tokens) and decode (``tg``, 64 tokens)
    tokens/s, the mean of 3 repetitions."""
    done = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(path), "-p", "128", "-n", "64", "-r", "3",
                           "-t", str(threads), "-o", "jsonl"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"llama-bench on {path.name}: {done.stderr[-300:]}")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in results}


def speed(args: argparse.Namespace) -> None:
    files = gguf_points(args)
    for rnd in range(args.rounds):
        for threads in (2, 1):
            for point, q, path in files if rnd % 2 == 0 else list(reversed(files)):
                tps = llama_bench(args.bin, path, threads)
                append_result(args.out, {"stage": "speed", "point": point, "gguf": q, "threads": threads, "round": rnd,
                                         "pp_tps": tps["pp"], "tg_tps": tps["tg"], **run_meta()})
                print(f"round {rnd} t{threads} {point:16s} {q:7s} pp {tps['pp']:8.1f}  tg {tps['tg']:7.1f}",
                      flush=True)


def speed_runs(speeds: list[dict]) -> list[list[dict]]:
    """The speed rows split into the invocations that wrote them (each runs rounds 0, 1, ... in order)."""
    runs: list[list[dict]] = []
    for r in speeds:
        if not runs or (r["round"] == 0 and runs[-1][-1]["round"] > 0):
            runs.append([])
        runs[-1].append(r)
    return runs


def same_run_ratio(runs: list[list[dict]], point: str, q: str, threads: int = 2) -> float | None:
    """Median decode tokens/s of ``point`` over the dense model's at the same type, in the one run that timed
    both (alternating them), or None when no run did."""
    import statistics

    for run in runs:
        mine = [r["tg_tps"] for r in run if r["point"] == point and r["gguf"] == q and r["threads"] == threads]
        dense = [r["tg_tps"] for r in run if r["point"] == "dense" and r["gguf"] == q and r["threads"] == threads]
        if mine and dense and point != "dense":
            return statistics.median(mine) / statistics.median(dense)
    return None


def summary(args: argparse.Namespace) -> list[dict]:
    """One row per (point, quantisation): perplexities, size, and the median tokens/s over rounds."""
    import statistics

    quality_rows = {(r["point"], r["gguf"]): r for r in rows(args.out, "quality") if r["chunks"] == args.chunks}
    speed_rows = rows(args.out, "speed")
    runs = speed_runs(speed_rows)
    builds = {r["point"]: r for r in rows(args.out, "build")}
    out = []
    for (point, q), r in quality_rows.items():
        base = point.removesuffix("-rec")  # recovery changes weights, not shapes: the base point's speed
        speeds = [s for s in speed_rows if s["point"] == base and s["gguf"] == q]

        def med(key: str, threads: int, speeds: list[dict] = speeds) -> float | None:
            values = [s[key] for s in speeds if s["threads"] == threads]
            return statistics.median(values) if values else None

        out.append({"point": point, "gguf": q, "parameters": builds.get(base, {}).get("parameters"),
                    "tg2_x_dense": same_run_ratio(runs, base, q),
                    "size_mib": r["size_mib"], "ppl_eval": r["ppl_eval"], "ppl_botchan": r["ppl_botchan"],
                    "tg2": med("tg_tps", 2), "pp2": med("pp_tps", 2), "tg1": med("tg_tps", 1), "pp1": med("pp_tps", 1)})
    return out


def report(args: argparse.Namespace) -> None:
    table = summary(args)
    dense = [r for r in table if r["point"] == "dense"]
    print("| point | type | MiB | ppl eval | ppl botchan | decode t/s (2 thr) | x dense, same type and run "
          "| prompt t/s (2 thr) | decode t/s (1 thr) | off the dense ladder |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in sorted(table, key=lambda r: (r["point"] != "dense", r["point"], QUANTS.index(r["gguf"]))):
        off = ""
        if r["point"] != "dense" and r["tg2"] is not None:
            # No dense point is at least as good in perplexity and at least as fast in decoding.
            dominated = any(d["ppl_eval"] <= r["ppl_eval"] and (d["tg2"] or 0) >= r["tg2"] for d in dense)
            off = "no" if dominated else "**yes**"
        ratio = "-" if r["tg2_x_dense"] is None else f"{r['tg2_x_dense']:.2f}"
        print(f"| {r['point']} | {r['gguf']} | {r['size_mib']:.0f} | {r['ppl_eval']:.2f} | {r['ppl_botchan']:.2f} | "
              f"{fmt(r['tg2'])} | {ratio} | {fmt(r['pp2'])} | {fmt(r['tg1'])} | {off} |")
    if args.plot:
        plot(table, Path(args.plot))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = sorted((r for r in table if r["point"] == "dense" and r["tg2"]), key=lambda r: r["tg2"])
    ax.plot([r["tg2"] for r in dense], [r["ppl_eval"] for r in dense], "k-o",
            label="dense: F16, Q8_0, Q5_K_M, Q4_K_M")
    for r in dense:
        ax.annotate(r["gguf"], (r["tg2"], r["ppl_eval"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    styles = {"uniform": ("tab:blue", "s"), "global": ("tab:orange", "^"), "joint": ("tab:green", "D")}
    for scope, (color, marker) in styles.items():
        for rec in (False, True):
            pts = [r for r in table if r["point"].startswith(scope) and r["point"].endswith("-rec") == rec and r["tg2"]]
            if pts:
                ax.scatter([r["tg2"] for r in pts], [r["ppl_eval"] for r in pts], marker=marker, edgecolors=color,
                           facecolors=color if rec else "none", label=f"{scope}{' + recovery' if rec else ''}")
                for r in pts:
                    name = r["point"].split("-", 1)[1].removesuffix("-rec")
                    ax.annotate(f"{name} {r['gguf']}", (r["tg2"], r["ppl_eval"]), fontsize=6,
                                xytext=(3, -8), textcoords="offset points", color=color)
    ax.set_xlabel("llama.cpp decode tokens/s (2 threads)")
    ax.set_ylabel("perplexity, Shakespeare eval (llama-perplexity, ctx 512)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=["build", "recovery", "quality", "speed", "report"])
    parser.add_argument("--bin", type=Path, help="llama.cpp's build/bin (llama-quantize, -perplexity, -bench)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    parser.add_argument("--scopes", nargs="+", default=["uniform", "global", "joint"],
                        help="plans to build at each ratio (llm shrink's --scope)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="MLP widths a multiple of this (llm shrink's --round-to); points get a -rN suffix")
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--recover", nargs="*", default=["uniform-0.3", "global-0.3"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[32768, 131072, 262144, 524288])
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--points", nargs="*", default=None, help="only these points (quality, speed)")
    parser.add_argument("--quants", nargs="+", default=list(QUANTS), help="only these types (quality, speed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/relprune-frontier"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    {"build": build, "recovery": recovery, "quality": quality, "speed": speed, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
