"""Structured pruning side by side with Torch-Pruning: a residual CNN and SmolLM2-135M's heads and MLP.

    pip install -c constraints.txt torch-pruning==1.6.1       # the peer (pure Python; not a dependency)
    python benchmarks/structured_bench.py cnn --out docs/data/structured_results.jsonl
    python benchmarks/structured_bench.py llm --out docs/data/structured_results.jsonl
    python benchmarks/structured_bench.py table --out docs/data/structured_results.jsonl

``cnn``: ResNet-20 (widths 16/32/64, 1x1 projection shortcuts) trained on Fashion-MNIST with SGD,
cosine schedule and shift/flip augmentation (the dense model is cached in --work, outside the
repo); then for each FLOPs reduction (to 50% and to 70% of the dense MACs) and each method, a pruned copy is
fine-tuned for the same number of epochs and its test accuracy, MACs and parameters (counted by Torch-Pruning's
``count_ops_and_params`` for every model alike) and CPU latency at batch 1 and 64 are recorded.
Our methods plan the FLOPs target with ``relprune.deploy.groups`` (global scope); each
Torch-Pruning importance gets the pruning ratio (``global_pruning=True``) whose MACs are the
closest at or below ours, so every row of one target has the same or fewer MACs than ours.

``llm``: SmolLM2-135M's attention head groups and MLP channels pruned by 20% and 30% of the decoder
layers' projection parameters (uniform sizes, so plain transformers loads the result), one-shot,
perplexity as in the language-model benchmark; each score with and without FLAP's bias compensation
("+bc": the removed columns' mean contribution added to o_proj / down_proj biases, which the saved
config expresses with attention_bias / mlp_bias). Torch-Pruning's LLM pruner did not finish tracing
here (benchmarks/tp_llm_probe.py).

One JSON line per finished cell; cells already in --out are skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]

OURS = ["rc", "fluctuation", "l1", "l2", "taylor", "random"]
PEER = ["tp-l1", "tp-l2", "tp-taylor", "tp-bn-scale", "tp-lamp", "tp-random"]
# What fits a sitting on 2 cores: ours (contribution and FLAP) and the magnitude/Taylor/random
# baselines, against Torch-Pruning's group L1/L2 norms, Taylor and random.
DEFAULT_METHODS = ["rc", "fluctuation", "l2", "taylor", "random", "tp-l1", "tp-l2", "tp-taylor", "tp-random"]
TARGETS = [0.5, 0.3]  # the pruned nets keep 50% and 70% of the dense MACs
# SmolLM2: "+bc" adds FLAP's bias compensation to o_proj and down_proj (FLAP as published is fluctuation+bc).
LLM_METHODS = ["rc", "fluctuation", "l2", "random", "fluctuation+bc", "rc+bc", "share", "share+bc",
               "fluctuation+refit", "share+refit", "rc+refit", "depth-influence", "depth-relative",
               "depth-relative+refit",
               # per-layer sizes (--scope global) and blocks with widths (--scope joint), FLAP-style names
               *(f"{scope}-{score}+refit" for scope in ("global", "joint") for score in ("fluctuation", "rc", "share"))]
#: The methods of the issue-21 comparison: FLAP as published, ours with the re-fit, ShortGPT and our depth score.
LLM_DEFAULT_METHODS = ["fluctuation+bc", "fluctuation+refit", "share+refit", "rc+refit", "depth-influence",
                       "depth-relative"]


def _done(out: Path) -> set[tuple]:
    if not out.is_file():
        return set()
    rows = map(json.loads, out.read_text().splitlines())
    return {(r["part"], r["method"], r["target"], r.get("seed", 0)) for r in rows}


def _write(out: Path, row: dict) -> None:
    row = {**row, "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d")}
    with out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def latency(model: nn.Module, shape: tuple[int, ...], batch: int) -> float:
    x = torch.randn(batch, *shape)
    model.eval()
    with torch.no_grad():
        return median_seconds(lambda: model(x), 30 if batch == 1 else 10)


# -- the CNN ---------------------------------------------------------------------
def dense_cnn(args, data):
    from relprune.experiments.models import resnet20
    from relprune.experiments.training import TrainConfig, evaluate, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"resnet20-fmnist-e{args.epochs}-s{args.dense_seed}.pt"
    torch.manual_seed(args.dense_seed)
    model = resnet20(data.input_shape, data.num_classes)
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=5e-4,
                      seed=args.dense_seed, augment="crop-flip")
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        train(model, data, cfg, checkpoint=work / f"{path.stem}.ckpt", desc="dense",
              log=lambda s: print(s, flush=True))
        torch.save(model.state_dict(), path)
    return model.eval(), evaluate(model, data.test)


def finetune(model, data, args) -> float:
    from relprune.experiments.training import TrainConfig, evaluate, train

    if args.finetune_epochs:
        train(model, data, TrainConfig(epochs=args.finetune_epochs, batch_size=128, lr=0.01, optimizer="sgd",
                                       weight_decay=5e-4, seed=args.seed, augment="crop-flip"), desc="finetune")
    return evaluate(model.eval(), data.test)


def tp_prune(dense, example, method: str, max_macs: float, calib, round_to: int = 1):
    """Torch-Pruning's MetaPruner with one importance; the ratio found by bisection on MACs."""
    import torch_pruning as tp

    def importance():
        return {"tp-l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
                "tp-l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
                "tp-taylor": lambda: tp.importance.GroupTaylorImportance(),
                "tp-bn-scale": lambda: tp.importance.BNScaleImportance(),
                "tp-lamp": lambda: tp.importance.LAMPImportance(p=2),
                "tp-random": lambda: tp.importance.RandomImportance()}[method]()

    def pruned(ratio: float):
        torch.manual_seed(0)
        model = copy.deepcopy(dense)
        imp = importance()
        pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                      ignored_layers=[model.fc], round_to=round_to if round_to > 1 else None)
        if method == "tp-taylor":
            model.zero_grad()
            for x, y in calib:
                nn.functional.cross_entropy(model(x), y).backward()
        pruner.step()
        return model, tp.utils.count_ops_and_params(model, example)

    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        model, (macs, params) = pruned(mid)
        if macs <= max_macs:
            hi, best = mid, (model, macs, params, mid)
        else:
            lo = mid
    if best is None:
        model, (macs, params) = pruned(hi)
        best = (model, macs, params, hi)
    return best


def _cnn_setup(args):
    import torch_pruning as tp

    import relprune
    from relprune.experiments.data import load_dataset
    from relprune.experiments.training import calibration_batches

    data = load_dataset("fashion-mnist", ROOT.parent / "shared" / "data", seed=args.dense_seed)
    dense, dense_acc = dense_cnn(args, data)
    example = torch.randn(1, *data.input_shape)
    macs0, params0 = tp.utils.count_ops_and_params(dense, example)
    calib = calibration_batches(data.train, 2048, batch_size=256, seed=args.seed)
    stats = relprune.collect_stats(dense, calib)
    return data, dense, dense_acc, example, (macs0, params0), calib, stats


def pruned_cnns(args, dense, example, dense_macs: float, calib, stats):
    """(target, method, model, macs, params, Torch-Pruning ratio, seconds) for every cell, rc first per target."""
    import torch_pruning as tp

    from relprune.deploy.groups import prune_groups

    if "rc" not in args.methods:
        raise SystemExit("the rc row sets the MACs every Torch-Pruning row must meet: keep it in --methods")
    for target in TARGETS:
        ours_macs = None
        for method in sorted(args.methods, key=lambda m: m != "rc"):
            start = time.perf_counter()
            if method in OURS:
                result = prune_groups(dense, example, target, criterion=method, stats=stats, budget="flops",
                                      scope="global", bias_compensation=method == "fluctuation", seed=args.seed,
                                      round_to=args.round_to)
                model = result.model
                macs, params = tp.utils.count_ops_and_params(model, example)
                ratio = None
                if method == "rc":
                    ours_macs = macs
            else:
                model, macs, params, ratio = tp_prune(dense, example, method, ours_macs or dense_macs * (1 - target),
                                                      calib[:4], args.round_to)
            label = method if args.round_to == 1 else f"{method} round{args.round_to}"
            yield target, label, model, macs, params, ratio, time.perf_counter() - start


def run_cnn(args) -> None:
    from relprune.experiments.training import evaluate

    out = Path(args.out)
    done = _done(out)
    data, dense, dense_acc, example, (macs0, params0), calib, stats = _cnn_setup(args)
    shape = data.input_shape
    if ("cnn", "dense", 0.0, args.seed) not in done:
        _write(out, {"part": "cnn", "method": "dense", "target": 0.0, "seed": args.seed, "accuracy": dense_acc,
                     "macs": macs0, "params": params0, "latency_b1_ms": latency(dense, shape, 1) * 1e3,
                     "latency_b64_ms": latency(dense, shape, 64) * 1e3, "epochs": args.epochs,
                     "dense_seed": args.dense_seed})
    for target, method, model, macs, params, ratio, seconds in pruned_cnns(args, dense, example, macs0, calib, stats):
        if ("cnn", method, target, args.seed) in done:
            continue
        oneshot = evaluate(model.eval(), data.test)
        acc = finetune(model, data, args)
        _write(out, {"part": "cnn", "method": method, "target": target, "seed": args.seed, "oneshot": oneshot,
                     "accuracy": acc, "macs": macs, "params": params, "macs_ratio": macs / macs0,
                     "params_ratio": params / params0, "tp_ratio": ratio, "prune_seconds": seconds,
                     "latency_b1_ms": latency(model, shape, 1) * 1e3,
                     "latency_b64_ms": latency(model, shape, 64) * 1e3,
                     "finetune_epochs": args.finetune_epochs, "dense_epochs": args.epochs,
                     "dense_seed": args.dense_seed})


def run_latency(args) -> None:
    """Latency of every pruned architecture against the dense net, measured alternately in one run.

    The architecture (not the weights) decides the latency, so the cells are re-pruned without a
    fine-tune. Each round times the dense and the pruned model back to back at batch 1 and 64; the
    ratio of the medians over the rounds is recorded. Run it on an otherwise idle machine. With
    --fold-batchnorm both models are timed with every BatchNorm folded into the convolution before
    it (torch.fx's ``fuse``, eval mode), as an inference deployment would run them.
    """
    from torch.fx.experimental.optimization import fuse

    out = Path(args.out)
    done = _done(out)
    part = "cnn-latency-folded" if args.fold_batchnorm else "cnn-latency"
    data, dense, _, example, (macs0, _), calib, stats = _cnn_setup(args)
    shape = data.input_shape
    dense_timed = fuse(dense) if args.fold_batchnorm else dense
    for target, method, model, macs, _, _, _ in pruned_cnns(args, dense, example, macs0, calib, stats):
        if (part, method, target, args.seed) in done:
            continue
        if args.fold_batchnorm:
            model = fuse(model)
        row = {"part": part, "method": method, "target": target, "seed": args.seed,
               "macs_ratio": macs / macs0, "rounds": args.latency_rounds}
        for batch in (1, 64):
            dense_t, pruned_t = [], []
            for _ in range(args.latency_rounds):
                dense_t.append(latency(dense_timed, shape, batch))
                pruned_t.append(latency(model, shape, batch))
            row[f"dense_b{batch}_ms"] = statistics.median(dense_t) * 1e3
            row[f"pruned_b{batch}_ms"] = statistics.median(pruned_t) * 1e3
            row[f"ratio_b{batch}"] = row[f"pruned_b{batch}_ms"] / row[f"dense_b{batch}_ms"]
        _write(out, row)


# -- the language model ------------------------------------------------------------
def run_llm(args) -> None:
    """Width: units scored, planned with uniform sizes, then shrunk with FLAP's bias compensation (+bc),
    with the least-squares re-fit of the readers (+refit, sequential), or as they are. Depth: whole
    blocks removed by ShortGPT's block influence or by our relative contribution, as many as remove
    the same share of the decoder projections' parameters (rounded to whole blocks, at least that share)."""
    from relprune.llm import (
        calibration_windows,
        evaluation_windows,
        load_model,
        perplexity,
        tokenize_file,
    )
    from relprune.llm.depth import block_scores, plan_blocks, remove_blocks
    from relprune.llm.joint import plan_joint, residual_shares, shrink_joint
    from relprune.llm.known import known_text
    from relprune.llm.structured import (
        layer_sizes,
        plan_units,
        shrink_refit,
        shrink_units,
        unit_compensation,
        unit_scores,
    )
    from relprune.llm.text import batches_of

    out = Path(args.out)
    done = _done(out)
    data = ROOT.parent / "shared" / "data" / "shakespeare"
    for target in args.llm_targets:
        for method in args.llm_methods:
            label = f"{method}+distill{args.recover_steps}" if args.recover_steps else method
            if ("llm", label, target, args.seed) in done:
                continue
            model, tok = load_model("smollm2-135m", fetch=False, quiet=True, device="cpu")
            proj = sum(p.numel() for n, p in model.model.layers.named_parameters() if "proj" in n)
            calib = calibration_windows(tokenize_file(tok, data / "calib.txt"), args.calibration_samples, 512,
                                        args.seed)
            start = time.perf_counter()
            batches = batches_of(calib, 8)
            base, _, fix = method.partition("+")
            scope, _, score = base.rpartition("-") if base.startswith(("global-", "joint-")) else ("uniform", "", base)
            extra = {}
            if scope == "joint":
                scores = unit_scores(model, batches, score, seed=args.seed)
                plan = plan_joint(model, scores, residual_shares(model, batches), target, round_to=args.round_to)
                extra = {"removed_blocks": shrink_joint(model, batches, plan)["removed"], "scope": scope}
            elif base.startswith("depth-"):
                per_block = proj / len(model.model.layers)
                count = int(-(-target * proj // per_block))
                drop = plan_blocks(block_scores(model, batches, base.removeprefix("depth-")), count)
                remove_blocks(model, drop)
                extra = {"removed_blocks": drop}
                if fix == "refit":
                    raise SystemExit("depth-...+refit is not implemented")
            else:
                keep = plan_units(model, unit_scores(model, batches, score, seed=args.seed), target, scope=scope,
                                  round_to=args.round_to)
                if fix == "refit":
                    shrink_refit(model, batches, keep)
                else:
                    delta = unit_compensation(model, batches, keep) if fix == "bc" else None
                    shrink_units(model, keep, bias_delta=delta)
                if scope != "uniform":
                    extra = {"scope": scope}
            seconds = time.perf_counter() - start
            if args.recover_steps:
                from relprune.llm.distill import distill

                teacher, _ = load_model("smollm2-135m", fetch=False, quiet=True, device="cpu")
                windows = calibration_windows(tokenize_file(tok, data / "calib.txt"), args.recover_samples,
                                              args.recover_seqlen, args.seed + 1)
                report = distill(model, teacher, batches_of(windows, args.recover_batch), steps=args.recover_steps,
                                 lr=args.recover_lr)
                del teacher
                method = f"{method}+distill{args.recover_steps}"
                extra = {**extra, "recover_steps": report.steps, "recover_tokens": report.tokens,
                         "recover_seconds": round(report.seconds, 1), "recover_lr": args.recover_lr,
                         "recover_loss": [round(report.first_loss, 4), round(report.last_loss, 4)]}
            after = sum(p.numel() for n, p in model.model.layers.named_parameters() if "proj" in n and "weight" in n)
            windows = evaluation_windows(tokenize_file(tok, data / "eval.txt"), 512, 16)
            ppl = perplexity(model, windows, batch_size=4)
            if args.second_domain:
                other = evaluation_windows(tokenize_file(tok, known_text("botchan")), 512, 16)
                extra = {**extra, "perplexity_botchan": perplexity(model, other, batch_size=4).value}
            _write(out, {"part": "llm", "method": method, "target": target, "seed": args.seed,
                         "perplexity": ppl.value, "params_ratio": after / proj,
                         "sizes": layer_sizes(model)["layers"][0], "layers": len(model.model.layers),
                         "parameters": sum(p.numel() for p in model.parameters()), "round_to": args.round_to,
                         "prune_seconds": round(seconds, 1), "calibration_samples": args.calibration_samples,
                         **extra})


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = []
    cnn = [r for r in rows if r["part"] == "cnn"]
    lat = {(r["target"], r["method"]): r for r in rows if r["part"] == "cnn-latency"}
    folded = {(r["target"], r["method"]): r for r in rows if r["part"] == "cnn-latency-folded"}
    if cnn:
        dense = [r for r in cnn if r["method"] == "dense"]
        if dense:
            d = dense[0]
            lines.append(f"Dense ResNet-20: test accuracy {d['accuracy']:.4f}, {d['macs'] / 1e6:.2f} M MACs, "
                         f"{d['params'] / 1e3:.1f} k parameters.\n")
        lines.append("| FLOPs cut | method | seeds | one-shot acc | fine-tuned acc (mean +- sd) | MACs ratio | "
                     "params ratio | latency ratio b1 | latency ratio b64 | BN folded b1 | BN folded b64 |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for target in TARGETS:
            methods = list(dict.fromkeys(r["method"] for r in cnn if r["target"] == target))
            cells = {m: [r for r in cnn if r["target"] == target and r["method"] == m] for m in methods}
            means = {m: statistics.fmean(r["accuracy"] for r in c) for m, c in cells.items()}
            best = max(means.values(), default=None)
            for m, c in cells.items():
                sd = statistics.stdev(r["accuracy"] for r in c) if len(c) > 1 else 0.0
                acc = f"{means[m]:.4f} +- {sd:.4f}" if len(c) > 1 else f"{means[m]:.4f}"
                acc = f"**{acc}**" if means[m] == best else acc
                lr = lat.get((target, m))
                b1, b64 = (f"{lr['ratio_b1']:.2f}", f"{lr['ratio_b64']:.2f}") if lr else ("-", "-")
                fr = folded.get((target, m))
                f1, f64 = (f"{fr['ratio_b1']:.2f}", f"{fr['ratio_b64']:.2f}") if fr else ("-", "-")
                lines.append(f"| {target:.0%} | {m} | {len(c)} | {statistics.fmean(r['oneshot'] for r in c):.4f} | "
                             f"{acc} | {statistics.fmean(r['macs_ratio'] for r in c):.3f} | "
                             f"{statistics.fmean(r['params_ratio'] for r in c):.3f} | {b1} | {b64} | {f1} | {f64} |")
    llm = [r for r in rows if r["part"] == "llm"]
    if llm:
        lines.append("\n| params cut | method | perplexity | projections kept | kept heads / kv heads / MLP width |")
        lines.append("|---|---|---:|---:|---|")
        order = {m: i for i, m in enumerate(LLM_METHODS)}
        best = {t: min(r["perplexity"] for r in llm if r["target"] == t) for t in {r["target"] for r in llm}}
        for r in sorted(llm, key=lambda r: (r["target"], order.get(r["method"], len(order)))):
            s = r["sizes"]
            ppl = f"{r['perplexity']:.2f}"
            ppl = f"**{ppl}**" if r["perplexity"] == best[r["target"]] else ppl
            shape = (f"{s['num_attention_heads']} / {s['num_key_value_heads']} / {s['intermediate_size']}"
                     f"{' x ' + str(r['layers']) + ' layers' if r.get('layers', 30) != 30 else ''}")
            lines.append(f"| {r['target']:.0%} | {r['method']} | {ppl} | {r.get('params_ratio', 0):.3f} | {shape} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["cnn", "latency", "llm", "table"])
    p.add_argument("--out", default="docs/data/structured_results.jsonl")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "relprune" / "structured_bench"))
    p.add_argument("--epochs", type=int, default=15, help="dense training epochs (default: 15)")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs per pruned model (default: 1)")
    p.add_argument("--methods", nargs="+", choices=OURS + PEER, default=DEFAULT_METHODS)
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--llm-methods", nargs="+", choices=LLM_METHODS, default=LLM_DEFAULT_METHODS)
    p.add_argument("--llm-targets", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    p.add_argument("--second-domain", action="store_true",
                   help="also the perplexity on Botchan (16 windows of 512 tokens), the second-domain text")
    p.add_argument("--recover-steps", type=int, default=0, help="distillation steps after shrinking (default: 0)")
    p.add_argument("--recover-lr", type=float, default=5e-5)
    p.add_argument("--recover-samples", type=int, default=64, help="recovery windows drawn from calib.txt")
    p.add_argument("--recover-seqlen", type=int, default=256)
    p.add_argument("--recover-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0,
                   help="calibration draw, random scores and fine-tune order (default: 0)")
    p.add_argument("--dense-seed", type=int, default=0, help="the dense ResNet-20's training seed (default: 0)")
    p.add_argument("--latency-rounds", type=int, default=7, help="alternating rounds per latency cell (default: 7)")
    p.add_argument("--round-to", type=int, default=1,
                   help="cnn/latency: every group keeps a multiple of this many channels (both libraries); llm: "
                        "every MLP (the recorded LLM rows ran with 1)")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="latency: fold BatchNorm into the convolutions of both models first")
    args = p.parse_args()
    if args.part == "table":
        print(table(Path(args.out)))
    elif args.part == "cnn":
        run_cnn(args)
    elif args.part == "latency":
        run_latency(args)
    else:
        run_llm(args)


if __name__ == "__main__":
    main()
