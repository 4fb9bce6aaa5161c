"""Every reader loads a pruned folder as the pruned model or refuses it by name: never a different model.

The loader matrix (issue 29): folders written by ``save_pretrained``, ``oneshot``, streamed pruning and
the command, dense (the default) and compressed, read by plain transformers with the current
compressed-tensors installed (CI installs it with the test extra), by plain transformers without it (a
subprocess where it cannot be imported), and by relprune's loader.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from test_compressed_folders import ids_batches
from tiny import tiny_llama, tiny_tokenizer

import relprune
from relprune.cli import main
from relprune.core.files import MANIFEST
from relprune.llm import load_causal_lm, oneshot, prune_sequential, prune_streamed, save_pretrained
from relprune.llm.compressed import COMPRESSED_MODEL_TYPE, COMPRESSED_WEIGHTS

transformers = pytest.importorskip("transformers")

# What an outside reader runs: plain transformers, the model built by the Auto class and by its own class,
# for every folder in one fresh process (importing transformers dominates its cost).
READER = textwrap.dedent("""
    import sys, json, torch
    if sys.argv[3] == "without":
        sys.modules["compressed_tensors"] = None  # transformers then sees no compressed-tensors installed
    import transformers
    folders, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
    for folder in folders:
        for build in (transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM):
            try:
                model = build.from_pretrained(folder)
            except Exception as err:
                print(json.dumps({"folder": folder, "refused": f"{type(err).__name__}: {err}"}))
                continue
            with torch.no_grad():
                print(json.dumps({"folder": folder, "logits": model(input_ids=ids).logits.tolist()}))
""")


def outside_reader(folders, ids, compressed_tensors: str) -> dict[str, list[dict]]:
    """What plain transformers makes of each folder (one answer per model class), in a fresh process."""
    run = subprocess.run([sys.executable, "-c", READER, json.dumps([str(f) for f in folders]),
                          json.dumps(ids.tolist()), compressed_tensors], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert run.returncode == 0, run.stderr[-2000:]
    answers: dict[str, list[dict]] = {str(f): [] for f in folders}
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            answer = json.loads(line)
            answers[answer.pop("folder")].append(answer)
    assert all(len(a) == 2 for a in answers.values()), answers
    return answers


def has_compressed_tensors() -> bool:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return False
    return True


def written_folders(tmp_path, folder) -> dict[str, tuple]:
    """(folder, the pruned model's logits on ``ids``) for each writer and layout."""
    ids = ids_batches(1)[0]["input_ids"]
    out = {}
    for layout in ("dense", "compressed"):
        model = tiny_llama()
        prune_sequential(model, ids_batches(), sparsity=0.5)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        save_pretrained(model, tiny_tokenizer(), tmp_path / f"save-{layout}", save_format=layout)
        out[f"save_pretrained/{layout}"] = (tmp_path / f"save-{layout}", want)
        kw = {} if layout == "dense" else {"save_format": "compressed"}
        # A mask-only recipe, so the dense model with the masks applied is the pruned model.
        masks = prune_streamed(folder, tmp_path / f"streamed-{layout}", ids_batches(), sparsity=0.5,
                               criterion="wanda", reconstruct=False, **kw)
        plain, _ = relprune.llm.load_model(folder)
        relprune.apply_masks(plain, masks)
        relprune.make_permanent(plain)
        with torch.no_grad():
            out[f"streamed/{layout}"] = (tmp_path / f"streamed-{layout}", plain(input_ids=ids).logits)
    result = oneshot(str(folder), folder.parent / "calib.txt", sparsity=0.5, samples=2, seqlen=16,
                     out=tmp_path / "oneshot", criterion="wanda", reconstruct=None)
    assert result.out == tmp_path / "oneshot"
    model, _ = relprune.llm.load_model(folder)
    relprune.apply_masks(model, result.masks)
    relprune.make_permanent(model)
    with torch.no_grad():
        out["oneshot/dense"] = (tmp_path / "oneshot", model(input_ids=ids).logits)
    return out, ids


@pytest.mark.slow
def test_no_reader_loads_a_different_model(tmp_path, folder):
    folders, ids = written_folders(tmp_path, folder)
    stacks = ["without", *(["with"] if has_compressed_tensors() else [])]
    if os.environ.get("CI") and "with" not in stacks:
        pytest.fail("CI must run the loader matrix with compressed-tensors installed (the test extra)")
    answers = {stack: outside_reader([p for p, _ in folders.values()], ids, stack) for stack in stacks}
    for label, (path, want) in folders.items():
        # relprune's own loader: the pruned model, whatever the layout.
        with torch.no_grad():
            torch.testing.assert_close(load_causal_lm(path)(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        for stack in stacks:
            for answer in answers[stack][str(path)]:
                if label.endswith("dense"):
                    assert "logits" in answer, (label, stack, answer)
                    torch.testing.assert_close(torch.tensor(answer["logits"]), want, rtol=1e-5, atol=1e-5)
                else:
                    assert "refused" in answer, (label, stack)  # never logits of another model
                    assert "relprune" in answer["refused"] or "model.safetensors" in answer["refused"], answer


def test_a_compressed_folder_names_its_reader_in_transformers_refusal(tmp_path):
    model = tiny_llama()
    prune_sequential(model, ids_batches(), sparsity=0.5)
    save_pretrained(model, None, tmp_path / "c", save_format="compressed")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["model_type"] == COMPRESSED_MODEL_TYPE and "quantization_config" not in config
    assert not (tmp_path / "c" / "model.safetensors").exists() and (tmp_path / "c" / COMPRESSED_WEIGHTS).is_file()
    with pytest.raises(ValueError, match=r"relprune\.llm\.load_model"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    with pytest.raises(OSError, match=r"model\.safetensors"):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "c")


def test_a_folder_in_the_earlier_compressed_tensors_marking_is_still_read(tmp_path):
    """Folders written before issue 29 (quantization_config + model.safetensors) load as they did."""
    from relprune.llm.compressed import COMPRESSION_KEY, sparsity_config

    model = tiny_llama()
    prune_sequential(model, ids_batches(), sparsity=0.5)
    save_pretrained(model, None, tmp_path / "c", save_format="compressed")
    old = tmp_path / "c"
    config = json.loads((old / "config.json").read_text())
    block = config.pop(COMPRESSION_KEY)
    config["model_type"] = block["model_type"]
    config["quantization_config"] = sparsity_config(block["format"], block["targets"], block["global_sparsity"])
    (old / "config.json").write_text(json.dumps(config))
    (old / COMPRESSED_WEIGHTS).rename(old / "model.safetensors")
    (old / MANIFEST).unlink()
    ids = ids_batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(old)(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_keep_the_users_umask(tmp_path, umask, folder):
    before = os.umask(umask)
    try:
        model = tiny_llama()
        prune_sequential(model, ids_batches(), sparsity=0.5)
        for layout in ("dense", "compressed"):
            save_pretrained(model, tiny_tokenizer(), tmp_path / layout, save_format=layout)
        assert main(["llm", "prune", "--model", str(folder), "--sparsity", "0.5", "--criterion", "wanda",
                     "--reconstruct", "none", "--calibration", str(folder.parent / "calib.txt"),
                     "--calibration-samples", "2", "--seqlen", "16", "--out", str(tmp_path / "cli")]) == 0
    finally:
        os.umask(before)
    for out in (tmp_path / "dense", tmp_path / "compressed", tmp_path / "cli"):
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask, out
        for f in out.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_save_pretrained_refuses_a_folder_with_an_earlier_checkpoint(tmp_path):
    """An earlier sharded checkpoint's index would be read instead of the new weights (issue 30)."""
    big = tiny_llama()
    big.save_pretrained(tmp_path / "x", max_shard_size="20KB")
    assert (tmp_path / "x" / "model.safetensors.index.json").is_file()
    before = sorted(p.name for p in (tmp_path / "x").iterdir())
    with pytest.raises(relprune.RelpruneError, match="already exists and is not an empty folder"):
        save_pretrained(tiny_llama(layers=1), None, tmp_path / "x")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == before


def test_a_changed_file_is_refused_unless_verification_is_off(tmp_path, capsys):
    """Two bits swapped within one bitmask row keep every count right: only the manifest can tell (issue 30)."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    prune_sequential(model, ids_batches(), sparsity=0.5)
    save_pretrained(model, tiny_tokenizer(), tmp_path / "c", save_format="compressed")
    path = tmp_path / "c" / COMPRESSED_WEIGHTS
    tensors = load_file(str(path))
    key = "model.layers.0.mlp.up_proj.bitmask"
    bits = torch.from_numpy(__import__("numpy").unpackbits(tensors[key].numpy(), axis=-1, bitorder="little"))
    row = bits[0]
    on, off = int(row.nonzero()[0]), int((row == 0).nonzero()[0])
    row[on], row[off] = 0, 1
    tensors[key] = torch.from_numpy(__import__("numpy").packbits(bits.numpy(), axis=-1, bitorder="little"))
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(relprune.IntegrityError, match=r"changed since relprune wrote it.*verify=False"):
        load_causal_lm(tmp_path / "c")
    swapped = load_causal_lm(tmp_path / "c", verify=False)  # what loading without the manifest would give
    assert not torch.equal(swapped.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert main(["llm", "eval", "--model", str(tmp_path / "c"), "--text", str(tmp_path / "c" / "config.json"),
                 "--seqlen", "8"]) == 1
    assert "--no-verify-weights" in capsys.readouterr().err


def test_a_changed_config_is_refused_before_the_tokenizer_reads_it(tmp_path, capsys):
    """The manifest is checked before anything of the folder is read (found by this session's own sweep)."""
    model = tiny_llama()
    prune_sequential(model, ids_batches(), sparsity=0.5)
    save_pretrained(model, tiny_tokenizer(), tmp_path / "c", save_format="compressed")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config.pop("relprune_compression")
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(relprune.IntegrityError, match=r"config\.json changed since"):
        relprune.llm.load_model(tmp_path / "c")
    with pytest.raises(relprune.ModelLoadError, match="names no model type"):
        relprune.llm.load_model(tmp_path / "c", verify=False)
