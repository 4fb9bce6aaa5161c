"""The vision commands: demo, train, prune, eval, bench, explain, export, load."""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.allocation import SCOPES
from ..core.files import MANIFEST
from ..defaults import (
    DEFAULT_BIAS_COMPENSATION,
    DEFAULT_CRITERION,
    DEFAULT_LIVENESS,
    DEFAULT_RECONSTRUCT,
    DEFAULT_SCOPE,
)
from ..errors import RelpruneError
from .flags import (
    add_dataclass_args,
    checked,
    criterion_name,
    criterion_names,
    fraction,
    from_args,
    n_m_value,
    non_negative,
    one_of,
    option,
    positive,
    refit_choices,
    refit_name,
    regularizer_names,
    seed_value,
    sparsity_value,
)
from .outputs import refuse_replacing, say, writable_folder

if TYPE_CHECKING:
    from ..experiments.experiment import Method


@dataclass
class Seed:
    seed: int = option("random seed (data split, init, shuffling)", 0, check=seed_value)


@dataclass
class Common(Seed):
    out: str = option("output folder", "runs/latest")


@dataclass
class DataArgs:
    dataset: str | None = option("digits (built in), mnist or fashion-mnist; for a saved model, its own", None)
    data_dir: str | None = option("folder with <Name>/raw/*.gz; else $RELPRUNE_DATA, the user cache, Debian's", None)
    download: bool = option("download missing MNIST / Fashion-MNIST files from the public mirrors", False)
    verify: bool = option("check data files against their SHA-256", False)
    verify_weights: bool = option("check a saved model's weights against the SHA-256s recorded when they were "
                                  "written", True)


@dataclass
class TrainArgs:
    model: str = option("lenet300, lenet5, vgg-small, resnet20, vit, or package.module:factory", "lenet300")
    epochs: int = option("training epochs", 10, check=positive)
    batch_size: int = option("batch size", 128, check=positive)
    lr: float = option("learning rate (cosine schedule)", 1e-3, check=positive)
    optimizer: str = option("adam, or sgd (momentum 0.9)", "adam", check=one_of("adam", "sgd"))
    weight_decay: float = option("weight decay", 0.0, check=non_negative)
    augment: str = option("none, crop (random shifts up to 2 pixels) or crop-flip (and mirroring)", "none",
                      check=one_of("none", "crop", "crop-flip"))
    pat: str = option("pruning-aware training regulariser: none, entropy, contrib-l1, l1", "none",
                  check=one_of("none", *regularizer_names()))
    pat_alpha: float = option("weight of the regulariser", 0.0, check=non_negative)
    pat_warmup: float = option("fraction of training over which alpha ramps up from 0", 0.2, check=fraction)


@dataclass
class Overwrite:
    overwrite: bool = option("replace what an earlier run wrote to --out (default: refuse)", False)


@dataclass
class MethodArgs:
    criterion: str = option("scoring criterion: " + ", ".join(criterion_names()), DEFAULT_CRITERION,
                        check=criterion_name)
    scope: str = option(", ".join(SCOPES), DEFAULT_SCOPE, check=one_of(*SCOPES))
    liveness: bool = option("condition statistics on the next activation's live range", DEFAULT_LIVENESS)
    bias_compensation: bool = option("fold removed weights' mean contribution into the bias", DEFAULT_BIAS_COMPENSATION)
    ucb_k: float = option("k in rc-ucb's E[r] + k Std[r]", 1.0, check=non_negative)
    refine: bool = option("swap pruned and kept weights within rows while each layer's output error on the "
                          "calibration inputs falls (after the criterion's mask, before any re-fit)", False)


@dataclass
class PruneArgs:
    checkpoint: str = option("model folder written by 'relprune train'", "runs/latest")
    sparsity: float | None = option("fraction of weights to remove, in [0, 1)", None, check=sparsity_value)
    n_m: str | None = option("N:M pattern instead of a sparsity, e.g. 2:4 (layers whose inputs - conv: input "
                         "channels - M does not divide stay dense and are named)", None, check=n_m_value)
    threshold: float | None = option("threshold mode: remove weights whose score < threshold / fan-in", None,
                                 check=positive)
    calib_samples: int = option("calibration samples from the training split", 1024, check=positive)
    finetune_epochs: int = option("masked fine-tuning epochs after pruning", 0, check=non_negative)
    finetune_lr: float = option("fine-tuning learning rate", 3e-4, check=positive)
    reconstruct: str = option(f"re-fit of the kept weights on the calibration inputs: {refit_choices()}, none, or "
                          "auto (exact unless fine-tuning or compensating biases, as the study found best)",
                          DEFAULT_RECONSTRUCT, check=refit_name)



def _load_data(d: DataArgs, seed: int):
    from ..experiments.data import load_dataset

    return load_dataset(d.dataset, d.data_dir, download_missing=d.download, verify=d.verify, seed=seed)


# -- commands ---------------------------------------------------------------------------

def cmd_train(ns: argparse.Namespace) -> int:
    from ..core.distributed import init_from_env, is_main
    from ..experiments.experiment import train_model
    from ..experiments.models import check_model_name
    from ..experiments.training import TrainConfig

    c, d, t = from_args(Common, ns), from_args(DataArgs, ns), from_args(TrainArgs, ns)
    init_from_env()  # under torchrun: one rank per process, gloo on CPU
    check_model_name(t.model)
    out = writable_folder(c.out)
    if (out / "model.safetensors").is_file() and not (out / "train.ckpt").is_file() and not ns.overwrite:
        raise RelpruneError(f"{out} already holds a trained model; choose another --out, or pass --overwrite "
                            "to train again and replace it")
    data = _load_data(d, c.seed)
    cfg = TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
                      weight_decay=t.weight_decay, seed=c.seed, augment=t.augment)
    _, info = train_model(t.model, data, cfg, out, pat=t.pat, pat_alpha=t.pat_alpha, pat_warmup=t.pat_warmup,
                          log=say)
    if is_main():
        print(f"{t.model} on {data.name}: test accuracy {info.metrics['test_acc']:.4f} -> "
              f"{out}/model.safetensors")
    return 0


def _prepare_model(checkpoint: str, d: DataArgs, seed: int):
    """A saved model and its data: its own dataset unless --dataset names another."""
    from ..errors import DataError
    from ..experiments.experiment import load_model

    model, info = load_model(checkpoint, verify=d.verify_weights)
    data = _load_data(dataclasses.replace(d, dataset=d.dataset or info.dataset), seed)
    if list(data.input_shape) != list(info.input_shape) or data.num_classes != info.num_classes:
        raise DataError(
            f"{data.name} has inputs {list(data.input_shape)} and {data.num_classes} classes; the model in "
            f"{checkpoint} takes {list(info.input_shape)} and {info.num_classes} (trained on {info.dataset})"
        )
    return model, info, data


def cmd_prune(ns: argparse.Namespace) -> int:
    from ..core.criteria import get_criterion
    from ..core.masks import format_report, sparsity_report
    from ..core.recipe import Recipe
    from ..experiments.experiment import ModelInfo, apply_method, gather, save_model
    from ..experiments.training import TrainConfig, calibration_batches, evaluate, save_json, train

    c, d, m, p = from_args(Common, ns), from_args(DataArgs, ns), from_args(MethodArgs, ns), from_args(PruneArgs, ns)
    # The recipe's one validation, before any work ("auto" re-fits are decided once the model is known).
    crit = get_criterion(m.criterion)
    Recipe.build(
        criterion=m.criterion, sparsity=p.sparsity, n_m=p.n_m, threshold=p.threshold,
        scope=m.scope if "scope" in ns.overrides or crit.joint is None else None,
        reconstruct=None if p.reconstruct in ("auto", "none") else p.reconstruct,
        bias_compensation=m.bias_compensation, refine=m.refine,
        options={"ucb_k": m.ucb_k} if "ucb_k" in crit.options else {})
    refuse_replacing(Path(c.out), ("model.safetensors", "model.json"), ns.overwrite, "a model")
    out = writable_folder(c.out)
    model, info, data = _prepare_model(p.checkpoint, d, c.seed)
    method = method_of(m, p, _refit(p, m, model))
    calib = calibration_batches(data.train, p.calib_samples, seed=c.seed)
    dense_acc = evaluate(model, data.test)
    stats, seconds = gather(model, calib, [method], method.liveness)
    masks = apply_method(model, stats, method, p.sparsity if p.sparsity is not None else 0.0, c.seed, calib[0][0])
    dense_layers = [r.name for r in sparsity_report(model) if r.name not in masks]
    pruned_acc = evaluate(model, data.test)
    sparsity = _model_sparsity(model)
    metrics = {"dense_test_acc": dense_acc, "oneshot_test_acc": pruned_acc, "sparsity": sparsity,
               "stats_seconds": seconds}
    if p.finetune_epochs:
        train(model, data, TrainConfig(epochs=p.finetune_epochs, lr=p.finetune_lr, seed=c.seed), desc="finetune")
        metrics["finetuned_test_acc"] = evaluate(model, data.test)
    metrics["test_acc"] = evaluate(model, data.test)
    save_model(model, ModelInfo(info.model, info.dataset, info.input_shape, info.num_classes, c.seed, metrics,
                                {"method": dataclasses.asdict(method), "threshold": p.threshold}), out)
    report = sparsity_report(model)
    save_json([dataclasses.asdict(r) | {"sparsity": r.sparsity} for r in report], out / "report.json")
    print(format_report(report))
    if dense_layers:
        print(f"left dense (inputs not a multiple of {method.n_m.split(':')[1]}): {', '.join(dense_layers)}"
              if method.n_m else f"left dense: {', '.join(dense_layers)}")
    print(f"{method.label}: sparsity {sparsity:.2%} of all prunable weights; test accuracy dense {dense_acc:.4f} "
          f"-> pruned {pruned_acc:.4f}"
          + (f" -> fine-tuned {metrics['finetuned_test_acc']:.4f}" if p.finetune_epochs else "")
          + f"; saved to {out}")
    return 0


def method_of(m: MethodArgs, p: PruneArgs, refit: bool | str) -> Method:
    """The bench :class:`Method` that ``relprune prune``'s flags spell (its label names the same recipe)."""
    from ..experiments.experiment import Method

    return Method(m.criterion, m.scope, m.liveness, m.bias_compensation, p.n_m, m.ucb_k, refit,
                  threshold=p.threshold, refine=m.refine)


def _refit(p: PruneArgs, m: MethodArgs, model) -> bool | str:
    """The re-fit: --reconstruct's (True for exact, as method labels keep it), or auto (exact) when the
    pruned model is used as it is (no fine-tune, no bias compensation) and every prunable layer has an
    input Gram."""
    from ..core.layers import gram_supported, prunable_layers

    if p.reconstruct == "none":
        return False
    if p.reconstruct != "auto":
        return True if p.reconstruct == "exact" else p.reconstruct
    return (not p.finetune_epochs and not m.bias_compensation
            and all(gram_supported(layer) for layer in prunable_layers(model).values()))


def _model_sparsity(model) -> float:
    from ..core.masks import sparsity_report

    rows = sparsity_report(model)
    total = sum(r.total for r in rows)
    return 1 - sum(r.kept for r in rows) / total if total else 0.0


def cmd_eval(ns: argparse.Namespace) -> int:
    from ..core.masks import format_report, sparsity_report
    from ..experiments.training import evaluate

    c, d = from_args(Seed, ns), from_args(DataArgs, ns)
    model, info, data = _prepare_model(ns.checkpoint, d, c.seed)
    print(format_report(sparsity_report(model)))
    print(f"{info.model} on {data.name}: test accuracy {evaluate(model, data.test):.4f}, "
          f"validation {evaluate(model, data.val):.4f}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from ..experiments.bench import BenchConfig, run_bench

    cfg = BenchConfig.from_file(ns.config) if ns.config else BenchConfig()
    for f in dataclasses.fields(BenchConfig):
        if f.name in ns.overrides:
            setattr(cfg, f.name, getattr(ns, f.name))
    cfg.validate()
    results = run_bench(cfg, writable_folder(ns.out))
    print(f"results: {results}\nreport: {results.parent / 'report.md'}\n"
          f"plot: {results.parent / 'accuracy_vs_sparsity.png'}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from ..experiments.bench import RESULTS_FILE, BenchConfig, run_bench
    from ..experiments.report import load_results, markdown_tables

    start = time.perf_counter()
    cfg = BenchConfig(
        models=["lenet300:digits"], criteria=list(dict.fromkeys([DEFAULT_CRITERION, "magnitude", "wanda"])),
        sparsities=[0.5, 0.75, 0.9], seeds=[ns.seed], regimes=["oneshot", "finetune"], calib_samples=[512],
        epochs=ns.epochs, batch_size=64, finetune_epochs=ns.finetune_epochs, lr=1e-3, finetune_lr=5e-4,
    )
    out = writable_folder(ns.out)
    earlier = len(load_results(out / RESULTS_FILE))
    if earlier:
        say(f"{earlier} cells: reusing the results of an earlier demo in {ns.out} (pass another --out to start "
            "afresh)")
    results = run_bench(cfg, out, log=say)
    print(markdown_tables(load_results(results)))
    print(f"plot: {results.parent / 'accuracy_vs_sparsity.png'}  ({time.perf_counter() - start:.0f} s)")
    return 0


def cmd_explain(ns: argparse.Namespace) -> int:
    from .. import collect_stats
    from ..experiments.explain import format_summary, plot_explain, summarise
    from ..experiments.training import calibration_batches, save_json

    c, d = from_args(Common, ns), from_args(DataArgs, ns)
    refuse_replacing(Path(c.out), ("explain.json", "explain.png"), ns.overwrite, "an explanation")
    out = writable_folder(c.out)
    model, _, data = _prepare_model(ns.checkpoint, d, c.seed)
    calib = calibration_batches(data.train, ns.calib_samples, seed=c.seed)
    stats = collect_stats(model, calib, statistics=["relative_mean", "relative_std"])
    rows = summarise(stats, ns.tau, ns.ucb_k)
    png = plot_explain(stats, out / "explain.png", ns.ucb_k)
    save_json([dataclasses.asdict(r) for r in rows], out / "explain.json")
    print(format_summary(rows, ns.tau))
    print(f"plot: {png}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    import tempfile

    import torch

    from .. import collect_stats
    from ..core.files import staged_folder
    from ..core.masks import apply_masks
    from ..deploy.export import export_dense, export_masked, export_onnx, export_sparse, file_size
    from ..deploy.graph import DependencyGraph
    from ..deploy.groups import GROUP_SCORES, group_scores, structured_masks
    from ..deploy.shrink import shrink
    from ..errors import DataError
    from ..experiments.experiment import load_model
    from ..experiments.training import TrainConfig, calibration_batches, evaluate, train

    c = from_args(Common, ns)
    if ns.finetune_epochs and not ns.structured:
        raise RelpruneError("--finetune-epochs fine-tunes after --structured; without it, fine-tune with "
                            "`relprune prune --finetune-epochs` before exporting")
    out = _export_target(Path(c.out), ns.overwrite)
    if ns.onnx:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:  # before any work: the extra is missing
            raise RelpruneError("--onnx needs the onnx extra: pip install 'relprune[onnx]'") from err
    writable_folder(out.parent)
    model, info = load_model(ns.checkpoint, verify=ns.verify_weights)
    model.eval()
    example = torch.zeros(2, *info.input_shape)
    if ns.structured:
        # The structured step removes whole channels on top of whatever was pruned before: its cost in accuracy
        # is measured and shown, and --finetune-epochs recovers it (the masks hold through the fine-tune).
        d = from_args(DataArgs, ns)
        needed = GROUP_SCORES[ns.score].statistics
        try:
            data = _load_data(dataclasses.replace(d, dataset=d.dataset or info.dataset), c.seed)
        except DataError:
            if needed or ns.finetune_epochs:
                raise
            data = None  # l1 / l2 need no data; the accuracy then goes unmeasured, and the line says so
        stats = None
        if needed:
            stats = collect_stats(model, calibration_batches(data.train, 1024, seed=c.seed), statistics=list(needed))
        before_acc, before_sparsity = evaluate(model, data.test) if data else None, _model_sparsity(model)
        graph = DependencyGraph(model, example)
        keep = {gi: torch.sort(torch.argsort(v, stable=True)[min(round(ns.structured * v.numel()),
                                                                  v.numel() - 1):]).values
                for gi, v in group_scores(graph, stats, ns.score, c.seed).items()}
        apply_masks(model, structured_masks(graph, keep))
        after_acc = evaluate(model, data.test) if data else None
        line = (f"structured {ns.structured:g} ({ns.score}): sparsity {before_sparsity:.2%} -> "
                f"{_model_sparsity(model):.2%} of the prunable weights; "
                + (f"test accuracy {before_acc:.4f} -> {after_acc:.4f}" if data else
                   "test accuracy not measured (its data are not here)"))
        if ns.finetune_epochs:
            train(model, data, TrainConfig(epochs=ns.finetune_epochs, lr=ns.finetune_lr, seed=c.seed),
                  desc="finetune", log=say)
            line += f" -> fine-tuned {evaluate(model, data.test):.4f}"
        elif data is not None and before_acc - after_acc > 0.01:
            line += (f"; it cost {100 * (before_acc - after_acc):.1f} points: pass --finetune-epochs to recover "
                     "them before shrinking")
        say(line)
    small, report = shrink(model, example)
    meta = {"model": info.model, "dataset": info.dataset, "input_shape": info.input_shape,
            "num_classes": info.num_classes}
    # The whole export is written beside --out and renamed into place in one step (an earlier export swapped
    # out the same way): an interrupted export leaves the old one whole, never a mix.
    with staged_folder(out, replace=True) as tmp, tempfile.TemporaryDirectory() as scratch:
        paths = {
            "dense (shrunk)": export_dense(small, tmp / "dense", meta),
            "masked": export_masked(model, tmp / "masked", meta),
            "sparse (bitmask + values)": export_sparse(model, tmp / "sparse", meta),
        }
        if ns.onnx:
            paths["onnx (shrunk)"] = export_onnx(small, example, tmp / "onnx")
        base = file_size(export_dense(load_model(ns.checkpoint, verify=False)[0], Path(scratch), meta))
        sizes = {label: file_size(path) for label, path in paths.items()}
        paths = {label: out / path.relative_to(tmp) for label, path in paths.items()}
    print(report)
    print(f"{'form':28} {'bytes':>10} {'vs dense original':>18}")
    print(f"{'dense original':28} {base:10d} {1:18.3f}")
    for label, path in paths.items():
        print(f"{label:28} {sizes[label]:10d} {sizes[label] / base:18.3f}  {path}")
    return 0


#: What an export folder holds (and nothing else): its forms and the manifest of their SHA-256s.
EXPORT_PARTS = ("dense", "masked", "sparse", "onnx", MANIFEST)


def _export_target(out: Path, overwrite: bool) -> Path:
    """``--out`` for an export: absent, empty, or (with --overwrite) an earlier export, which is replaced whole."""
    if out.exists() and not out.is_dir():
        raise RelpruneError(f"--out {out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in held if n not in EXPORT_PARTS]
    if foreign:
        raise RelpruneError(f"--out {out} holds files that are not an export ({foreign[0]}); an export replaces its "
                            "folder whole, so choose an empty or new --out")
    refuse_replacing(out, EXPORT_PARTS[:4], overwrite, "an export")
    return out


def cmd_load(ns: argparse.Namespace) -> int:
    from ..core.masks import format_report, sparsity_report
    from ..deploy.export import load_exported
    from ..experiments.training import evaluate

    model, meta = load_exported(ns.path, verify=ns.verify_weights)
    print(f"{meta['format']} model: {sum(p.numel() for p in model.parameters())} parameters")
    print(format_report(sparsity_report(model)))
    if ns.evaluate:
        d = from_args(DataArgs, ns)
        d = dataclasses.replace(d, dataset=d.dataset or meta.get("dataset", "mnist"))
        data = _load_data(d, ns.seed)
        shape = meta.get("input_shape")
        if shape is not None and list(data.input_shape) != list(shape):
            from ..errors import DataError

            raise DataError(f"{data.name} has inputs {list(data.input_shape)}; the model takes {list(shape)}")
        print(f"test accuracy on {data.name} {evaluate(model, data.test):.4f}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the vision commands under the ``relprune`` parser."""
    from ..core.units import score_names


    def command(name: str, help_: str, *groups: type, out: str = "runs/latest") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        for g in groups:
            add_dataclass_args(p, g, {"out": out, "dataset": "mnist" if name == "train" else None})
        return p

    demo = command("demo", "train a small model on the built-in digits, prune it by the default criterion "
                   "(ours), magnitude and Wanda, fine-tune, print a table and write a plot",
                   Common, out="runs/demo")
    demo.add_argument("--epochs", type=checked(int, positive), default=30, help="training epochs (default: 30)")
    demo.add_argument("--finetune-epochs", type=checked(int, non_negative), default=5,
                      help="fine-tuning epochs (default: 5)")
    demo.set_defaults(func=cmd_demo)

    command("train", "train a model and save it (resumes an interrupted run in the same --out)",
            Common, Overwrite, DataArgs, TrainArgs).set_defaults(func=cmd_train)
    command("prune", "prune a trained model by one method at one sparsity and save it with its masks",
            Common, Overwrite, DataArgs, MethodArgs, PruneArgs, out="runs/pruned").set_defaults(func=cmd_prune)
    ev = command("eval", "print a saved model's accuracy and per-layer sparsity", Seed, DataArgs)
    ev.add_argument("--checkpoint", default="runs/latest", help="model folder (default: runs/latest)")
    ev.set_defaults(func=cmd_eval)

    from ..experiments.bench import BenchConfig

    bench = sub.add_parser("bench", help="sweep models x methods x sparsities x seeds; write results.jsonl, "
                           "report.md and accuracy_vs_sparsity.png",
                           description="Sweep; settings from --config (TOML), each overridable by a flag.")
    bench.add_argument("--config", help="TOML file of BenchConfig settings (see configs/)")
    bench.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    add_dataclass_args(bench, BenchConfig)
    bench.set_defaults(func=cmd_bench)

    ex = command("explain", "per-layer plots of relative contributions, share under a threshold, and "
                 "neuron entropy", Common, Overwrite, DataArgs, out="runs/explain")
    ex.add_argument("--checkpoint", default="runs/latest", help="model folder (default: runs/latest)")
    ex.add_argument("--calib-samples", type=checked(int, positive), default=1024,
                    help="calibration samples (default: 1024)")
    ex.add_argument("--tau", type=checked(float, positive), default=0.1,
                    help="threshold as a fraction of 1/I (default: 0.1)")
    ex.add_argument("--ucb-k", type=checked(float, non_negative), default=1.0,
                    help="k in E[r] + k Std[r] (default: 1)")
    ex.set_defaults(func=cmd_explain)

    exp = command("export", "shrink a (pruned) model and write it dense, masked and sparse, with sizes",
                  Common, Overwrite, DataArgs, out="runs/export")
    exp.add_argument("--checkpoint", default="runs/pruned", help="model folder (default: runs/pruned)")
    exp.add_argument("--structured", type=checked(float, sparsity_value), default=0.0,
                     help="first remove this fraction of the channels of every prunable group (a layer's units "
                          "with everything coupled to them) (default: 0, none)")
    exp.add_argument("--score", "--structured-criterion", dest="score", choices=score_names(gradients=False),
                     default="rc", help="structured score of each channel for --structured, over the dependency "
                                        "graph (as `relprune llm shrink --score`; default: rc)")
    exp.add_argument("--finetune-epochs", type=checked(int, non_negative), default=0,
                     help="with --structured: fine-tune the masked model this many epochs before shrinking "
                          "(default: 0)")
    exp.add_argument("--finetune-lr", type=checked(float, positive), default=3e-4,
                     help="fine-tuning learning rate (default: 0.0003)")
    exp.add_argument("--onnx", action="store_true",
                     help="also write the shrunk model as onnx/model.onnx for ONNX Runtime (needs the onnx extra)")
    exp.set_defaults(func=cmd_export)

    ld = command("load", "read an exported model back, print its size and sparsity, and evaluate it",
                 Seed, DataArgs)
    ld.add_argument("path", help="an exported folder or .safetensors file")
    ld.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                    help="evaluate on the test split of its dataset (default: True)")
    ld.set_defaults(func=cmd_load)
