"""Sweeps: models x methods x sparsities x seeds x regimes, one JSON line per finished cell.

A rerun skips cells already in ``results.jsonl``; an output folder whose
recorded settings (training, fine-tuning, data) differ from this run's is
refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..core.allocation import parse_n_m
from ..core.criteria import get_criterion
from ..core.masks import current_masks
from ..core.reconstruct import REFITS
from ..defaults import MAX_SEED
from ..errors import RelpruneError
from .data import Split, load_dataset
from .experiment import (
    Method,
    apply_method,
    fresh_copy,
    gather,
    gradual_prune,
    iterative_prune,
    load_model,
    train_model,
)
from .report import load_results, write_report
from .training import TrainConfig, calibration_batches, evaluate, save_json, train

REGIMES = ("oneshot", "finetune", "iterative", "gradual")
TIMING_FIELDS = ("stats_seconds", "cell_seconds", "finished")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a TOML value has the type a BenchConfig field declares (an int is a fine float)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) not in args:
        return any(_fits(value, a) for a in args)
    if type(None) in args:
        return value is None or _fits(value, next(a for a in args if a is not type(None)))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_args(hint) else hint.__name__


@dataclass
class BenchConfig:
    """A sweep. Every list is a grid axis; see configs/*.toml for examples."""

    models: list[str] = field(default_factory=lambda: ["lenet300:mnist"])
    criteria: list[str] = field(default_factory=lambda: ["rc", "contrib-std", "magnitude", "wanda"])
    scopes: list[str] = field(default_factory=lambda: ["global"])
    n_m: list[str] = field(default_factory=list)
    liveness: list[bool] = field(default_factory=lambda: [True])
    bias_compensation: list[bool] = field(default_factory=lambda: [False])
    ucb_k: list[float] = field(default_factory=lambda: [1.0])
    #: Re-fits of the kept weights: false, true (= "exact": least squares) or "obs" (SparseGPT's sweep).
    reconstruct: list[bool | str] = field(default_factory=lambda: [False])
    #: Methods named by label ('wanda -live [row]', 'rc +refit'), beside the grid of the fields above.
    methods_extra: list[str] = field(default_factory=list)
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.9, 0.95])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    regimes: list[str] = field(default_factory=lambda: ["oneshot", "finetune"])
    calib_samples: list[int] = field(default_factory=lambda: [1024])
    pat: list[str] = field(default_factory=lambda: ["none"])  # "none" or "kind:alpha", e.g. "entropy:0.1"
    pat_warmup: float = 0.2
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    finetune_epochs: int = 1
    finetune_lr: float = 3e-4
    #: Fine-tunes stop when validation accuracy has not improved for this many epochs (0: never);
    #: finetune_epochs is then the most they train.
    finetune_patience: int = 0
    iterative_rounds: int = 3
    #: Pruning steps of the gradual regime (Zhu & Gupta's cubic schedule over one pass of the data).
    gradual_steps: int = 10
    #: "config": dense models train with epochs/lr/batch_size above (Adam, cosine); "converged": each
    #: (model, dataset) with its own recipe from relprune.experiments.recipes.
    dense_recipe: str = "config"
    data_dir: str | None = None
    download: bool = False
    max_train_samples: int | None = None
    finetune_max_samples: int | None = None
    threads: int | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> BenchConfig:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        path = Path(path)
        if not path.is_file():
            raise RelpruneError(f"bench config {path} does not exist (see configs/ for examples)")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise RelpruneError(f"{path} is not valid TOML: {err}") from err
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise RelpruneError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        wrong = [f"{k} = {v!r} (expected {_type_name(hints[k])})" for k, v in raw.items()
                 if not _fits(v, hints[k])]
        if wrong:
            raise RelpruneError(f"{path}: wrong types: {'; '.join(wrong)}")
        return cls(**raw)

    def validate(self) -> None:
        # Grid axes that may not be empty (n_m and methods_extra add methods and may be).
        empty = [name for name in ("models", "liveness", "bias_compensation", "ucb_k", "reconstruct",
                                   "sparsities", "seeds", "regimes", "calib_samples", "pat")
                 if not getattr(self, name)]
        if empty:
            raise RelpruneError(f"{empty[0]} is empty: the sweep would have no cells; give at least one value")
        for name in ("epochs", "batch_size", "iterative_rounds", "gradual_steps"):
            if getattr(self, name) < 1:
                raise RelpruneError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise RelpruneError(f"{name} must be positive, got {getattr(self, name)}")
        if self.finetune_epochs < 0 or self.finetune_patience < 0 or any(c < 1 for c in self.calib_samples):
            raise RelpruneError("finetune_epochs and finetune_patience must be >= 0 and calib_samples >= 1")
        if self.dense_recipe not in ("config", "converged"):
            raise RelpruneError(f"dense_recipe must be 'config' or 'converged', got {self.dense_recipe!r}")
        for c in self.criteria:
            get_criterion(c)
        for label in self.methods_extra:
            Method.parse(label)
        bad = [r for r in self.regimes if r not in REGIMES]
        if bad:
            raise RelpruneError(f"unknown regimes {bad}; known: {REGIMES}")
        for p in self.pat:
            parse_pat(p)
        for spec in self.models:
            if ":" not in spec:
                raise RelpruneError(f"models entries look like 'lenet300:mnist', got {spec!r}")
        for s in self.sparsities:
            if not 0 <= s < 1:
                raise RelpruneError(f"sparsity {s} is outside [0, 1)")
        bad_refits = [r for r in self.reconstruct if r not in (False, True) and r not in REFITS]
        if bad_refits:
            raise RelpruneError(f"reconstruct takes false, true (exact) or one of {tuple(REFITS)}, got {bad_refits}")
        if any(not 0 <= seed < MAX_SEED for seed in self.seeds):
            raise RelpruneError(f"seeds are whole numbers from 0 to 2^62 - 1, got {self.seeds}")
        if not self.methods():
            raise RelpruneError("criteria x scopes (and n_m) and methods_extra give no method: the sweep has no cells")
        schedules = sorted(set(self.regimes) & {"iterative", "gradual"})
        by_threshold = [m.label for m in self.methods() if m.threshold is not None]
        if schedules and by_threshold:
            raise RelpruneError(f"threshold methods {by_threshold} have no sparsity schedule for the {schedules} "
                                "regimes; run them in oneshot/finetune, or give them a sparsity")

    def settings(self) -> dict[str, Any]:
        """What every cell's number depends on beyond its own key."""
        out = {k: getattr(self, k) for k in ("epochs", "batch_size", "lr", "finetune_epochs", "finetune_lr",
                                             "iterative_rounds", "pat_warmup", "max_train_samples",
                                             "finetune_max_samples")}
        # Settings added later enter only when set, so folders written before them stay valid.
        for k, default in (("finetune_patience", 0), ("gradual_steps", 10), ("dense_recipe", "config")):
            if getattr(self, k) != default:
                out[k] = getattr(self, k)
        return out

    def methods(self) -> list[Method]:
        out: list[Method] = []
        for c in self.criteria:
            for live in self.liveness:
                for bc in self.bias_compensation:
                    for rec in (True if r == "exact" else r for r in self.reconstruct):
                        if bc and rec:
                            continue  # a re-fit already corrects the removed mean
                        for k in (self.ucb_k if c == "rc-ucb" else [1.0]):
                            grid = [Method(c, s, live, bc, None, k, rec) for s in self.scopes]
                            grid += [Method(c, "global", live, bc, p, k, rec) for p in self.n_m]
                            # Liveness changes activation statistics only; gradients, |W| and the Gram ignore it.
                            out.extend(m if m.uses_activations else dataclasses.replace(m, liveness=True)
                                       for m in grid)
        out.extend(Method.parse(label) for label in self.methods_extra)
        return list(dict.fromkeys(out))


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _clean_torn_tail(path: Path) -> None:
    """Drop a half-written last line left by an interrupted run."""
    if not path.is_file():
        return
    text = path.read_text()
    if text and not text.endswith("\n"):
        path.write_text(text[: text.rfind("\n") + 1])


def check_out_dir(out: Path, cfg: BenchConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    settings = cfg.settings()
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise RelpruneError(
                f"{out} holds results made with different settings ({', '.join(diff)}); "
                "use another --out, or delete the folder to start over"
            )
    else:
        save_json(settings, settings_path)


def parse_pat(spec: str) -> tuple[str, float]:
    """'none' -> ('none', 0.0); 'entropy:0.1' -> ('entropy', 0.1)."""
    if spec == "none":
        return "none", 0.0
    kind, _, alpha = spec.partition(":")
    from ..train.regularizers import REGULARIZERS

    try:
        value = float(alpha)
    except ValueError:
        value = -1.0
    if kind not in REGULARIZERS or value <= 0:
        raise RelpruneError(f"pat entries look like 'entropy:0.1' (kinds: {', '.join(REGULARIZERS)}), got {spec!r}")
    return kind, value


def dense_model(cfg: BenchConfig, out: Path, model_name: str, dataset: str, data, seed: int, pat: str,
                alpha: float) -> tuple[torch.nn.Module, float]:
    """Train (or load) the dense model of one (model, dataset, seed, PAT) combination."""
    tag = f"{model_name}_{dataset}_s{seed}" + ("" if pat == "none" else f"_{pat}{alpha:g}")
    folder = out / "dense" / tag
    if cfg.dense_recipe == "converged":
        from .recipes import converged_recipe

        tcfg = converged_recipe(model_name, dataset, seed=seed)
    else:
        tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)
    if (folder / "model.safetensors").is_file():
        model, info = load_model(folder)
        trained = info.extra.get("train_config")
        if trained is not None and trained != asdict(tcfg):
            diff = sorted(k for k in set(trained) | set(asdict(tcfg)) if trained.get(k) != asdict(tcfg).get(k))
            raise RelpruneError(f"{folder} was trained with another recipe ({', '.join(diff)} differ); delete it "
                                "to train it again, or use another --out")
        return model, info.metrics["test_acc"]
    model, info = train_model(model_name, data, tcfg, folder, pat=pat, pat_alpha=alpha, pat_warmup=cfg.pat_warmup,
                              desc=f"dense {tag}")
    return model, info.metrics["test_acc"]


def cells(cfg: BenchConfig) -> Iterator[dict[str, Any]]:
    """Every cell key of the grid, in the order the sweep runs them."""
    for spec in cfg.models:
        model_name, dataset = spec.split(":", 1)
        for seed in cfg.seeds:
            for pat_spec in cfg.pat:
                pat, alpha = parse_pat(pat_spec)
                for calib in cfg.calib_samples:
                    for method in cfg.methods():
                        if method.n_m:
                            n, m = parse_n_m(method.n_m)
                            sparsities: list[float | None] = [round(1 - n / m, 6)]
                        elif method.threshold is not None:
                            sparsities = [None]  # the threshold decides; the row records what it reached
                        else:
                            sparsities = list(cfg.sparsities)
                        for s in sparsities:
                            for regime in cfg.regimes:
                                yield {"model": model_name, "dataset": dataset, "seed": seed, "pat": pat,
                                       "pat_alpha": alpha, "calib_samples": calib, "method": method.label,
                                       # Fields at their defaults stay out, so keys from before they existed stay.
                                       **{f"m_{k}": v for k, v in asdict(method).items()
                                          if k not in _OPTIONAL_FIELDS or v != _OPTIONAL_FIELDS[k]},
                                       "sparsity": s, "regime": regime}


#: Method fields added after results were first written, with the value that leaves them out of a key.
_OPTIONAL_FIELDS = {"reconstruct": False, "threshold": None, "refine": False}


def _budget(c: dict[str, Any], method: Method) -> str:
    return f"t={method.threshold:g}" if c["sparsity"] is None else f"{c['sparsity']:.2f}"


def key_of(cell: dict[str, Any]) -> str:
    """The identity of a cell in results.jsonl."""
    return json.dumps(cell, sort_keys=True)


#: The results file of a sweep's output folder; a rerun skips the cells it already holds.
RESULTS_FILE = "results.jsonl"


def run_bench(cfg: BenchConfig, out: str | Path, *, log=print) -> Path:
    """Run every unfinished cell, appending to out/results.jsonl, then write the report and plot."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    check_out_dir(out, cfg)
    results = out / RESULTS_FILE
    _clean_torn_tail(results)
    done = {r["key"] for r in load_results(results)}
    todo = [c for c in cells(cfg) if key_of(c) not in done]
    log(f"{len(done)} cells finished before, {len(todo)} to run -> {results}")
    settings_id = _settings_hash(cfg.settings())
    datasets: dict[tuple[str, int], Any] = {}
    start = time.perf_counter()
    by_model: dict[tuple, list[dict[str, Any]]] = {}
    for c in todo:
        by_model.setdefault((c["model"], c["dataset"], c["seed"], c["pat"], c["pat_alpha"]), []).append(c)
    for (model_name, dataset, seed, pat, alpha), group in by_model.items():
        data = datasets.get((dataset, seed))
        if data is None:
            data = load_dataset(dataset, cfg.data_dir, download_missing=cfg.download, seed=seed)
            if cfg.max_train_samples:
                data.train = data.train.head(cfg.max_train_samples)
            datasets = {(dataset, seed): data}
        ft_data = data
        if cfg.finetune_max_samples and cfg.finetune_max_samples < len(data.train):
            # A fixed random subset, so the short fine-tune sees every class.
            idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed + 99))
            ft_data = dataclasses.replace(data, train=Split(data.train.x[idx[:cfg.finetune_max_samples]],
                                                            data.train.y[idx[:cfg.finetune_max_samples]]))
        dense, dense_acc = dense_model(cfg, out, model_name, dataset, data, seed, pat, alpha)
        log(f"dense {model_name}/{dataset} seed {seed} pat {pat}: test accuracy {dense_acc:.4f}")
        stats_cache: dict[tuple[int, bool], tuple[Any, float]] = {}
        calib_cache: dict[int, list] = {}
        for c in group:
            t0 = time.perf_counter()
            method = Method(**{k[2:]: v for k, v in c.items() if k.startswith("m_")})
            calib = calib_cache.setdefault(c["calib_samples"], calibration_batches(data.train, c["calib_samples"],
                                                                                 seed=seed))
            ft = TrainConfig(epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, lr=cfg.finetune_lr, seed=seed,
                             patience=cfg.finetune_patience)
            model = fresh_copy(dense)
            stats_seconds = None
            try:
                if c["regime"] == "iterative":
                    masks = iterative_prune(model, ft_data, calib, method, c["sparsity"], cfg.iterative_rounds, ft)
                elif c["regime"] == "gradual":
                    masks = gradual_prune(model, ft_data, calib, method, c["sparsity"], cfg.gradual_steps, ft)
                    train(model, ft_data, ft, desc=f"finetune {method.label} {_budget(c, method)}")
                else:
                    skey = (c["calib_samples"], method.liveness)
                    if skey not in stats_cache:
                        same = [Method(**{k[2:]: v for k, v in o.items() if k.startswith("m_")}) for o in group
                                if o["calib_samples"] == c["calib_samples"]]
                        same = [m for m in same if m.liveness == method.liveness]
                        stats_cache[skey] = gather(dense, calib, same, method.liveness)
                    stats, stats_seconds = stats_cache[skey]
                    masks = apply_method(model, stats, method, c["sparsity"], seed, calib[0][0])
                    if c["regime"] == "finetune":
                        train(model, ft_data, ft, desc=f"finetune {method.label} {_budget(c, method)}")
            except RelpruneError as err:
                # One impossible cell (e.g. an N:M pattern no layer admits) must not end the sweep;
                # it is not recorded, so a rerun tries it again.
                log(f"skipped {method.label} {_budget(c, method)} {c['regime']}: {err}")
                continue
            acc = evaluate(model, data.test)
            achieved = current_masks(model).sparsity
            row = {**c, "key": key_of(c), "accuracy": acc, "dense_accuracy": dense_acc,
                   # A threshold cell is reported at the sparsity it reached.
                   **({"sparsity": round(achieved, 6)} if c["sparsity"] is None else {}),
                   "achieved_sparsity": achieved, "pruned_layers": len(masks),
                   "settings": settings_id,
                   "stats_seconds": stats_seconds, "cell_seconds": time.perf_counter() - t0,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _append(results, row)
            log(f"{model_name}/{dataset} s{seed} {method.label:24} {_budget(c, method)} {c['regime']:9} "
                f"acc {acc:.4f}")
    rows = load_results(results)
    wall = time.perf_counter() - start
    preamble = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. "
                f"This invocation ran {len(todo)} cells in {wall / 60:.1f} min. "
                f"Settings: `{json.dumps(cfg.settings(), sort_keys=True)}`.\n")
    write_report(rows, out, preamble)
    return results
