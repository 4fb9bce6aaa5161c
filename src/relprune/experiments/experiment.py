"""The experiment side's shared steps: a pruning method as data, pruning pipelines, model files.

Built only on the public API (collect_stats, prune) plus the data, model and
training modules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import collect_stats, load_state_dict, prune
from ..core.allocation import nm_fits, parse_n_m
from ..core.checkpoint import check_fits, meta_numel, stored_numel
from ..core.criteria import get_criterion
from ..core.files import atomic_file, atomic_write_text, check_tensors_sha256, tensors_sha256
from ..core.layers import named_layers, prunable_layers
from ..core.masks import MASKED_ATTRIBUTES, Masks, copy_model, mask_key_parts
from ..core.recipe import Recipe
from ..core.reconstruct import REFITS
from ..core.stats import Stats
from ..defaults import DEFAULT_BIAS_COMPENSATION, DEFAULT_CRITERION, DEFAULT_LIVENESS, DEFAULT_SCOPE
from ..errors import CheckpointError, RelpruneError
from .data import Data, Split
from .models import build_model
from .training import TrainConfig, train


@dataclass(frozen=True)
class Method:
    """One pruning method: criterion and the options that change what it removes."""

    criterion: str = DEFAULT_CRITERION
    scope: str = DEFAULT_SCOPE
    liveness: bool = DEFAULT_LIVENESS
    bias_compensation: bool = DEFAULT_BIAS_COMPENSATION
    n_m: str | None = None
    ucb_k: float = 1.0
    #: False, True (the exact least-squares re-fit, as the study ran it) or another re-fit's name ("obs").
    reconstruct: bool | str = False
    #: A threshold budget (remove relative scores below threshold / fan-in) instead of a sparsity.
    threshold: float | None = None
    #: Error-lowering swaps within rows after the criterion's mask (relprune.core.refine).
    refine: bool = False

    @property
    def label(self) -> str:
        """A short readable name, e.g. 'rc', 'rc -live +bc [layer]', 'wanda 2:4', 'obs +refit', 'rc t=0.5'."""
        parts = [self.criterion]
        if self.uses_activations and not self.liveness:
            parts.append("-live")
        if self.bias_compensation:
            parts.append("+bc")
        if self.refine:
            parts.append("+refine")
        if self.refit_name:
            parts.append(REFITS[self.refit_name].label)
        if self.criterion == "rc-ucb" and self.ucb_k != 1.0:
            parts.append(f"k={self.ucb_k:g}")
        if self.threshold is not None:
            parts.append(f"t={self.threshold:g}")
        if self.n_m:
            parts.append(self.n_m)
        elif self.scope != "global":
            parts.append(f"[{self.scope}]")
        return " ".join(parts)

    @property
    def refit_name(self) -> str | None:
        """The re-fit's name in :data:`relprune.core.reconstruct.REFITS` (``True`` is ``"exact"``), or None."""
        return "exact" if self.reconstruct is True else (self.reconstruct or None)

    @property
    def uses_activations(self) -> bool:
        """Whether liveness can change what this method removes (the input Gram counts every sample)."""
        return bool(set(self.statistics()) - {"weight_grad", "input_gram"})

    def recipe(self, sparsity: float | None = None) -> Recipe:
        """The recipe this method applies at ``sparsity`` (N:M and threshold methods take their own budget)."""
        crit = get_criterion(self.criterion)
        options = {"ucb_k": self.ucb_k} if "ucb_k" in crit.options else {}
        # A joint criterion (SparseGPT) chooses its own comparison group: scope does not apply.
        own_budget = self.n_m is not None or self.threshold is not None
        return Recipe(criterion=self.criterion, sparsity=None if own_budget else sparsity, n_m=self.n_m,
                      threshold=self.threshold, scope=None if crit.joint is not None else self.scope,
                      reconstruct=self.refit_name,
                      bias_compensation=self.bias_compensation, refine=self.refine, options=options)

    def statistics(self) -> list[str]:
        return sorted(self.recipe().statistics())

    @classmethod
    def parse(cls, label: str) -> Method:
        """The method a :attr:`label` names: 'wanda -live [row]', 'rc +refit', 'magnitude [layer]', 'obs 2:4',
        'rc t=0.5', 'wanda +refine'."""
        words = label.split()
        if not words:
            raise RelpruneError("a method label needs a criterion, e.g. 'wanda -live [row]'")
        fields: dict[str, Any] = {"criterion": words[0], "liveness": True}
        get_criterion(words[0])
        labels = {r.label: name for name, r in REFITS.items()}  # '+refit' -> 'exact'
        for w in words[1:]:
            if w == "-live":
                fields["liveness"] = False
            elif w == "+bc":
                fields["bias_compensation"] = True
            elif w in labels:
                fields["reconstruct"] = True if labels[w] == "exact" else labels[w]
            elif w == "+refine":
                fields["refine"] = True
            elif w.startswith("k=") or w.startswith("t="):
                try:
                    value = float(w[2:])
                except ValueError:
                    raise RelpruneError(f"method label {label!r}: {w!r} needs a number after '='") from None
                fields["ucb_k" if w[0] == "k" else "threshold"] = value
            elif w.startswith("[") and w.endswith("]"):
                fields["scope"] = w[1:-1]
            elif ":" in w:
                parse_n_m(w)
                fields["n_m"] = w
            else:
                raise RelpruneError(f"method label {label!r}: unknown part {w!r} (known: -live, +bc, +refine, +refit, "
                                    "+obs, k=, t=, N:M, [scope])")
        method = cls(**fields)
        # The recipe's one validation (a budget of 0.5 stands in for the sweep's sparsities).
        try:
            method.recipe(0.5).validate()
        except RelpruneError as err:
            raise RelpruneError(f"method label {label!r}: {err}") from None
        return method


def gather(model: nn.Module, calib: list[tuple[Tensor, Tensor]], methods: list[Method],
           liveness: bool) -> tuple[Stats | None, float]:
    """One statistics pass serving every method given (with this liveness); returns stats and seconds."""
    wanted = sorted({s for m in methods for s in m.statistics()})
    if not wanted:
        return None, 0.0
    start = time.perf_counter()
    stats = collect_stats(model, calib, liveness=liveness, statistics=wanted)
    return stats, time.perf_counter() - start


def apply_method(model: nn.Module, stats: Stats | None, method: Method, sparsity: float, seed: int,
                 example: Tensor | None = None) -> Masks:
    """Prune ``model`` in place by ``method`` to ``sparsity`` (N:M methods ignore sparsity).

    ``example`` (an input batch) is needed by criteria that trace the model (``rc-flow``)."""
    recipe = method.recipe(sparsity).validate()
    if "importance" in recipe.crit.options:
        if example is None or stats is None:
            raise RelpruneError(f"criterion {method.criterion!r} needs statistics and an example input")
        from ..deploy.importance import output_importance

        recipe = replace(recipe, options={**recipe.options, "importance": output_importance(model, stats, example)})
    if method.n_m:
        # Layers whose inputs (conv: input channels) M does not divide stay dense, as N:M kernels require.
        m = int(method.n_m.split(":")[1])
        names = stats.keys() if stats is not None else prunable_layers(model).keys()
        modules = named_layers(model)
        eligible = [n for n in names if nm_fits(modules[n].weight.shape, m)]
        return prune(model, stats, recipe, layers=eligible, seed=seed)
    return prune(model, stats, recipe, seed=seed)


def sparsity_schedule(final: float, rounds: int) -> list[float]:
    """Sparsities s_1 < ... < s_rounds = final, each round removing the same fraction of what is left."""
    return [1 - (1 - final) ** ((k + 1) / rounds) for k in range(rounds)]


def iterative_prune(model: nn.Module, data: Data, calib: list[tuple[Tensor, Tensor]], method: Method,
                    sparsity: float, rounds: int, finetune: TrainConfig) -> Masks:
    """Prune in ``rounds`` steps to ``sparsity``, re-collecting statistics and fine-tuning between steps."""
    masks = None
    for r, s in enumerate(sparsity_schedule(sparsity, rounds)):
        stats, _ = gather(model, calib, [method], method.liveness)
        masks = apply_method(model, stats, method, s, finetune.seed + r, calib[0][0])
        train(model, data, finetune, desc=f"iterative {r + 1}/{rounds}")
    assert masks is not None
    return masks


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - t / n)^3 at the n pruning steps t = 1..n."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def gradual_prune(model: nn.Module, data: Data, calib: list[tuple[Tensor, Tensor]], method: Method,
                  sparsity: float, steps: int, cfg: TrainConfig, *, passes: int = 1) -> Masks:
    """Prune while training (Zhu & Gupta 2017): ``passes`` shuffled passes over the training data
    in ``steps`` equal parts; before each part the sparsity rises along the cubic schedule, by
    ``method`` on statistics re-collected from the current model, and the part is trained on at
    ``cfg.lr`` (constant) with ``cfg.augment``."""
    if steps < 1 or passes < 1:
        raise RelpruneError(f"gradual pruning needs at least one step and one pass, got {steps} and {passes}")
    gen = torch.Generator().manual_seed(cfg.seed + 4_049)
    order = torch.cat([torch.randperm(len(data.train), generator=gen) for _ in range(passes)])
    parts = order.chunk(steps)
    if len(parts) < steps:
        raise RelpruneError(f"{steps} gradual steps need at least {steps} training samples, got {len(order)}")
    part_cfg = replace(cfg, epochs=1, schedule="constant", patience=0)
    masks = None
    for t, (s, idx) in enumerate(zip(cubic_schedule(sparsity, steps), parts, strict=True)):
        stats, _ = gather(model, calib, [method], method.liveness)
        masks = apply_method(model, stats, method, s, cfg.seed + t, calib[0][0])
        part = replace(data, train=Split(data.train.x[idx], data.train.y[idx]))
        train(model, part, replace(part_cfg, seed=cfg.seed + t), desc=f"gradual {t + 1}/{steps}")
    assert masks is not None
    return masks


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy_model(model)


# -- model files --------------------------------------------------------------------

@dataclass
class ModelInfo:
    """What is needed to rebuild a saved model, plus what is known about it."""

    model: str
    dataset: str
    input_shape: list[int]
    num_classes: int
    seed: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def compact_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each mask stored once, as booleans, beside the masked weight itself.

    A masked layer holds its original weight and a mask of the weight's dtype: twice the dense size.
    Masked-out entries of the original never reach the output while the mask holds, so
    ``weight = original * mask`` plus a 1-byte mask restores the same model (see
    :func:`expand_state`). The file keys are ``X.weight`` and ``X.weight_mask`` (as before masks
    became parametrisations, so older files read the same way; an attention's packed projection
    ``A.in_proj_weight`` and ``A.in_proj_weight_mask``).
    """
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for key in list(state):
        parts = mask_key_parts(key)
        if parts is None:
            continue
        owner, attr = parts
        at = f"{owner}." if owner else ""
        mask = state.pop(key)
        state[f"{at}{attr}"] = (state.pop(f"{at}parametrizations.{attr}.original") * mask).contiguous()
        state[f"{at}{attr}_mask"] = mask.bool().contiguous()
    return state


def expand_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Undo :func:`compact_state` (a state dict in torch's own layout passes unchanged)."""
    state = dict(state)
    bare = tuple(f"{attr}_mask" for attr in MASKED_ATTRIBUTES)
    dotted = tuple(f".{b}" for b in bare)
    for key in [k for k, v in state.items() if (k.endswith(dotted) or k in bare) and v.dtype == torch.bool]:
        prefix = key[: -len("_mask")]
        weight = state.pop(prefix, None)
        if weight is None:
            raise CheckpointError(f"checkpoint holds a mask for {prefix!r} but not its weight")
        state[f"{prefix}_orig"] = weight
        state[key] = state[key].to(weight.dtype)
    return state


def save_model(model: nn.Module, info: ModelInfo, folder: str | Path) -> Path:
    """``folder/model.safetensors`` (weights, masks as booleans; each tensor's SHA-256 in its metadata) and
    ``folder/model.json``, each written atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in compact_state(model).items()}
    payload = save(state, metadata={"relprune_model": json.dumps(asdict(info)),
                                    "relprune_sha256": json.dumps(tensors_sha256(state))})
    with atomic_file(folder / "model.safetensors") as fh:
        fh.write(payload)
    atomic_write_text(json.dumps(asdict(info), indent=2) + "\n", folder / "model.json")
    return folder


def load_model(path: str | Path, *, verify: bool = True) -> tuple[nn.Module, ModelInfo]:
    """Rebuild a model saved by :func:`save_model` (a folder or its model.safetensors); each tensor is
    checked against the SHA-256 recorded when it was written (``verify=False`` skips that)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        folder = path
    elif path.is_file() and path.name in ("model.safetensors", "model.json"):
        folder = path.parent
    elif path.exists():
        raise CheckpointError(f"{path} is not a model folder or its model.safetensors")
    else:
        raise CheckpointError(f"{path} does not exist")
    meta_path = folder / "model.json"
    weights = folder / "model.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} does not hold model.json and model.safetensors")
    try:
        info = ModelInfo(**json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{meta_path}: not a relprune model description: {err}") from err
    shape = info.input_shape
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)
            and isinstance(info.num_classes, int) and info.num_classes > 0):
        raise CheckpointError(f"{meta_path}: input_shape must be a list of positive whole numbers and "
                              f"num_classes a positive whole number, got {shape!r} and {info.num_classes!r}")
    check_fits(meta_numel(lambda: build_model(info.model, tuple(shape), info.num_classes)),
               stored_numel([weights]), str(folder))
    model = build_model(info.model, tuple(shape), info.num_classes)
    try:
        stored = load_file(str(weights))
        with safe_open(str(weights), framework="pt") as fh:
            recorded = (fh.metadata() or {}).get("relprune_sha256")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: cannot read: {err}") from err
    if verify and recorded is not None:  # models saved before issue 30 carry none
        try:
            table = json.loads(recorded)
        except json.JSONDecodeError:
            table = None
        check_tensors_sha256(stored, table, str(weights))
    load_state_dict(model, expand_state(stored))
    return model, info


def train_model(model_name: str, data: Data, cfg: TrainConfig, folder: str | Path, *, pat: str = "none",
                pat_alpha: float = 0.0, pat_warmup: float = 0.2, desc: str = "train",
                log: Callable[[str], None] | None = None) -> tuple[nn.Module, ModelInfo]:
    """Build, train (resuming ``folder/train.ckpt``), evaluate and save one model, with optional PAT.

    The regulariser's hooks are removed whatever happens; the checkpoint goes once the model is saved.
    """

    from ..train.regularizers import alpha_ramp, make_regularizer
    from .training import evaluate

    folder = Path(folder)
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    penalty = alpha = None
    if pat != "none":
        penalty = make_regularizer(pat, model, data.train.x[:256])
        alpha = alpha_ramp(pat_alpha, pat_warmup, cfg.epochs, -(-len(data.train) // cfg.batch_size))
    try:
        run = {"model": model_name, "dataset": data.name, "pat": pat, "pat_alpha": pat_alpha,
               "pat_warmup": pat_warmup}
        history = train(model, data, cfg, penalty=penalty, alpha=alpha, checkpoint=folder / "train.ckpt",
                        run=run, desc=desc, log=log)
    finally:
        if penalty is not None:
            penalty.detach()
    metrics = {"test_acc": evaluate(model, data.test), "val_acc": evaluate(model, data.val)}
    info = ModelInfo(model_name, data.name, list(data.input_shape), data.num_classes, cfg.seed, metrics,
                     {"pat": pat, "pat_alpha": pat_alpha, "history": history, "train_config": asdict(cfg)})
    from ..core.distributed import barrier, is_main

    if is_main():  # under torchrun every rank holds the same model; one writes it
        save_model(model, info, folder)
        (folder / "train.ckpt").unlink(missing_ok=True)
    barrier()
    return model, info
