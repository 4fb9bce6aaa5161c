"""What a hostile new user tried on `relprune llm` (issue 23): each case refused in one line, or done
right, and nothing written or left behind."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from tiny import ids_batches, tiny_llama, tiny_tokenizer  # noqa: E402

import relprune  # noqa: E402
from relprune.cli import main  # noqa: E402
from relprune.llm import load as llm_load  # noqa: E402
from relprune.llm import prune_sequential  # noqa: E402


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _prune_args(folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["llm", "prune", "--model", folder, "--calibration", tmp_path / "calib.txt", "--calibration-samples",
            "4", "--seqlen", "16", *extra]


def test_the_search_allocation_runs_from_the_command_and_is_recorded(folder, tmp_path, capsys):
    code, err = _run([*_prune_args(folder, tmp_path, "--sparsity", "0.5", "--allocation", "search",
                                   "--search-evaluations", "4"), "--out", tmp_path / "search"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "search" / "relprune.json").read_text())
    assert (record["allocation"], record["search_evaluations"], record["search_seconds"]) == ("search", 4, None)


def test_owl_lambda_other_than_zero_is_accepted(folder, tmp_path, capsys):
    code, err = _run([*_prune_args(folder, tmp_path, "--sparsity", "0.5", "--allocation", "owl", "--owl-lambda",
                                   "0.1"), "--out", tmp_path / "owl"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "owl" / "relprune.json").read_text())["owl_lambda"] == 0.1


@pytest.mark.parametrize("extra, message", [
    (["--criterion", "sparsegpt", "--scope", "layer"], "scope does not apply"),
    (["--criterion", "snip"], "loss gradient"),
    (["--criterion", "rc-flow"], "output importance"),
    (["--seed", str(2**64)], "2\\^62"),
    (["--calibration-samples", "1000000000"], "distinct windows"),
    (["--search-evaluations", "8"], "add --allocation search"),
    (["--allocation", "errors", "--search-seconds", "5"], "add --allocation search"),
    (["--allocation", "search", "--search-evaluations", "0"], "evaluations must be at least 2"),
    (["--allocation", "search", "--search-evaluations", "-4"], "evaluations must be at least 2"),
    (["--allocation", "search", "--search-seconds", "-1"], "positive number of seconds"),
    (["--allocation", "search", "--search-seconds", "nan"], "positive number of seconds"),
    (["--allocation", "search", "--streamed"], "needs the model in memory"),
    (["--allocation", "search", "--owl-lambda", "0"], "lambda above 0"),
    (["--allocation", "search", "--sparsity", "0.995"], "cannot be met|sparsity"),
])
def test_bad_llm_prune_options_are_one_line_and_write_nothing(folder, tmp_path, capsys, extra, message):
    before = _listing(tmp_path)
    code, err = _run([*_prune_args(folder, tmp_path, "--sparsity", "0.5"), *extra, "--out", tmp_path / "o"], capsys)
    assert code in (1, 2) and len(err.splitlines()) == 1 and re.search(message, err), err
    assert _listing(tmp_path) == before


def test_sparsegpt_records_no_scope(folder, tmp_path, capsys):
    assert _run([*_prune_args(folder, tmp_path, "--sparsity", "0.5", "--criterion", "sparsegpt"), "--out",
                 tmp_path / "s"], capsys)[0] == 0
    assert json.loads((tmp_path / "s" / "relprune.json").read_text())["scope"] is None


def test_an_out_name_too_long_is_refused_before_the_work(folder, tmp_path, capsys, monkeypatch):
    import relprune.llm.sequential as sequential

    monkeypatch.setattr(sequential, "prune_block", lambda *a, **k: pytest.fail("pruned before checking --out"))
    code, err = _run([*_prune_args(folder, tmp_path, "--sparsity", "0.5"), "--out", tmp_path / ("x" * 250)],
                     capsys)
    assert code == 1 and "cannot be written" in err and len(err.splitlines()) == 1


def _edited_folder(folder: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "edited"
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 3}, "config asks for"),            # a random third layer would be saved
    ({"num_hidden_layers": 1}, "do not fit the config|has not"),  # the second layer would be dropped
    ({"hidden_size": 40, "head_dim": 10}, "config asks for|do not fit"),
    ({"intermediate_size": 10**12}, "config asks for"),       # 4 TB: refused before allocating
])
def test_a_folder_whose_config_and_weights_disagree_is_refused(folder, tmp_path, capsys, changes, message):
    edited = _edited_folder(folder, tmp_path, **changes)
    for argv in ([*_prune_args(edited, tmp_path, "--sparsity", "0.5"), "--out", tmp_path / "o"],
                 [*_prune_args(edited, tmp_path, "--sparsity", "0.5", "--streamed"), "--out", tmp_path / "o"],
                 ["llm", "eval", "--model", edited, "--text", tmp_path / "eval.txt", "--seqlen", "16"]):
        code, err = _run(argv, capsys)
        assert code == 1 and len(err.splitlines()) == 1 and re.search(message, err), err
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_safetensors_file_is_one_line(folder, tmp_path, capsys, damage):
    edited = _edited_folder(folder, tmp_path)
    weights = edited / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    for argv in (["llm", "eval", "--model", edited, "--text", tmp_path / "eval.txt", "--seqlen", "16"],
                 [*_prune_args(edited, tmp_path, "--sparsity", "0.5", "--streamed"), "--out", tmp_path / "o"]):
        code, err = _run(argv, capsys)
        assert code == 1 and len(err.splitlines()) == 1 and "internal error" not in err, err


def test_sigterm_during_streamed_pruning_leaves_no_staging_folder(folder, tmp_path, capsys, monkeypatch):
    import relprune.llm.streamed as streamed

    real = streamed.prune_block
    calls = []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(streamed, "prune_block", killed)
    before = _listing(tmp_path)
    code, err = _run([*_prune_args(folder, tmp_path, "--sparsity", "0.5", "--streamed"), "--out",
                      tmp_path / "o"], capsys)
    assert code == 130 and "interrupted" in err
    assert _listing(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_interrupted_gguf_conversion_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm_load, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm_load.convert_gguf(gguf)
    assert not [p for p in (tmp_path / "cache" / "models").iterdir()]


def test_block_progress_is_a_line_a_block_when_stderr_is_not_a_terminal(folder, tmp_path, capsys):
    code, err = _run([*_prune_args(folder, tmp_path, "--sparsity", "0.5"), "--out", tmp_path / "p"], capsys)
    assert code == 0
    assert re.search(r"blocks: 1/2 done \(model\.layers\.0\)", err) and "blocks: 2/2" in err, err


def test_bias_compensation_refusal_names_no_missing_function(tmp_path):
    model = tiny_llama()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    with pytest.raises(relprune.RelpruneError) as err:
        relprune.llm.save_pretrained(model, tiny_tokenizer(), tmp_path / "x")
    assert "export_model" not in str(err.value)
    for name in re.findall(r"relprune\.[\w.]+", str(err.value)):
        obj = relprune
        for part in name.split(".")[1:]:
            obj = getattr(obj, part)


@pytest.mark.parametrize("criterion", ["snip", "taylor", "rc-flow"])
def test_block_pruning_refuses_whole_model_criteria_by_name(criterion):
    with pytest.raises(relprune.RelpruneError, match=criterion):
        prune_sequential(tiny_llama(), ids_batches(), sparsity=0.5, criterion=criterion)


def test_calibration_windows_are_bounded_by_the_text():
    from relprune.llm.text import calibration_windows

    with pytest.raises(relprune.RelpruneError, match="distinct windows"):
        calibration_windows(torch.arange(100), 10**9, 16)
    assert calibration_windows(torch.arange(100), 85, 16).shape == (85, 16)


@pytest.mark.parametrize("scope, compensation", [("uniform", "refit"), ("global", "refit"), ("uniform", "bias")])
def test_llm_shrink_writes_a_smaller_folder_with_the_in_memory_logits(folder, tmp_path, capsys, scope, compensation):
    from relprune.llm.structured import (
        load_shrunk,
        plan_units,
        shrink_refit,
        shrink_units,
        unit_compensation,
        unit_scores,
    )
    from relprune.llm.text import batches_of, calibration_windows, tokenize_file

    code, err = _run(["llm", "shrink", "--model", folder, "--ratio", "0.3", "--scope", scope, "--calibration",
                      tmp_path / "calib.txt", "--calibration-samples", "4", "--seqlen", "16", "--out",
                      tmp_path / "small", "--compensation", compensation], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "small" / "relprune.json").read_text())
    assert record["parameters"] < record["dense_parameters"]
    # The same steps through the library give the same model.
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batches = batches_of(calibration_windows(tokenize_file(tokenizer, tmp_path / "calib.txt"), 4, 16, 0), 8)
    keep = plan_units(model, unit_scores(model, batches, "fluctuation"), 0.3, scope=scope)
    if compensation == "refit":
        shrink_refit(model, batches, keep)
    else:
        shrink_units(model, keep, bias_delta=unit_compensation(model, batches, keep))
    saved = load_shrunk(tmp_path / "small")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in saved.parameters()) == record["parameters"]


def test_llm_shrink_depth_removes_whole_blocks(folder, tmp_path, capsys):
    code, err = _run(["llm", "shrink", "--model", folder, "--ratio", "0.4", "--depth", "--calibration",
                      tmp_path / "calib.txt", "--calibration-samples", "4", "--seqlen", "16", "--out",
                      tmp_path / "d"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "d" / "relprune.json").read_text())
    assert record["sizes"]["num_hidden_layers"] == 1 and len(record["sizes"]["removed"]) == 1
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.num_hidden_layers == 1
    code, err = _run(["llm", "shrink", "--model", folder, "--ratio", "0.9", "--depth", "--calibration",
                      tmp_path / "calib.txt", "--seqlen", "16", "--out", tmp_path / "all"], capsys)
    assert code == 1 and "would remove all 2" in err and not (tmp_path / "all").exists()


def test_recorded_sizes_that_ask_for_more_than_the_weights_are_refused(folder, tmp_path, capsys):
    from relprune.llm.structured import load_shrunk

    assert _run(["llm", "shrink", "--model", folder, "--ratio", "0.3", "--scope", "global", "--calibration",
                 tmp_path / "calib.txt", "--calibration-samples", "4", "--seqlen", "16", "--out",
                 tmp_path / "small"], capsys)[0] == 0
    sizes_file = tmp_path / "small" / "relprune_sizes.json"
    if not sizes_file.is_file():
        pytest.skip("this plan came out uniform")
    sizes = json.loads(sizes_file.read_text())
    sizes["layers"][0]["intermediate_size"] = 10**12
    sizes_file.write_text(json.dumps(sizes))
    with pytest.raises(relprune.RelpruneError, match="do not fit"):
        load_shrunk(tmp_path / "small")


def test_llm_shrink_bad_ratio_is_one_line(folder, tmp_path, capsys):
    code, err = _run(["llm", "shrink", "--model", folder, "--ratio", "1", "--calibration", tmp_path / "calib.txt",
                      "--out", tmp_path / "o"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_oneshot_is_the_command_in_one_call(folder, tmp_path, capsys):
    result = relprune.llm.oneshot(folder, tmp_path / "calib.txt", sparsity=0.5, samples=4, seqlen=16,
                                  out=tmp_path / "api")
    assert result.recipe.criterion == relprune.defaults.DEFAULT_LLM_CRITERION == "admm"
    assert result.recipe.reconstruct == "exact" and result.recipe.scope is None
    assert _run(["llm", "prune", "--model", folder, "--sparsity", "0.5", "--calibration", tmp_path / "calib.txt",
                 "--calibration-samples", "4", "--seqlen", "16", "--out", tmp_path / "cli"], capsys)[0] == 0
    api, cli = ({k: v for k, v in json.loads((tmp_path / d / "relprune.json").read_text()).items() if k != "seconds"}
                for d in ("api", "cli"))
    assert api == cli  # the command is this call
    a = relprune.llm.load_causal_lm(tmp_path / "api")
    b = relprune.llm.load_causal_lm(tmp_path / "cli")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_oneshot_refuses_before_loading_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(llm_load, "resolve_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(relprune.RelpruneError, match="correct it twice"):
        relprune.llm.oneshot("smollm2-135m", tmp_path / "calib.txt", sparsity=0.5, bias_compensation=True)
    with pytest.raises(relprune.RelpruneError, match="not both"):
        relprune.llm.oneshot("smollm2-135m", tmp_path / "x.txt", relprune.core.recipe.Recipe.build(sparsity=0.5),
                             sparsity=0.5)
