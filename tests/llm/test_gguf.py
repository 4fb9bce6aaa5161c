"""GGUF files from shrunk models, written by llama.cpp's own converter and read back with the ``gguf`` reader:
every per-layer size, every tensor's shape and values (F16 rounding; Q8_0 within its step), blocks dropped;
bad plans, types and converters refused before anything is written."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import relprune  # noqa: E402
from relprune.cli.main import main as cli  # noqa: E402
from relprune.llm import gguf as G  # noqa: E402
from relprune.llm.depth import remove_blocks  # noqa: E402
from relprune.llm.structured import layer_sizes, plan_units, save_shrunk, shrink_units, unit_scores  # noqa: E402

WORDS = ["the", "king", "queen", "lord", "speak", "thou", "art", "my", "good", "sir", "love", "and", "to", "of"]


def converter() -> Path:
    """llama.cpp's converter, fetched from the package index into the cache on first use (as
    ``relprune llm gguf --fetch-converter`` does); only a machine without the index skips, never CI."""
    try:
        return G.converter_dir(fetch=True)
    except G.GGUFError:
        if os.environ.get("CI"):
            raise
        pytest.skip("llama.cpp's converter could not be fetched (no package index?)")


def llama_tokenizer():
    """A Llama-style byte-fallback BPE tokenizer (what llama.cpp's converter reads from tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for w in ["▁", *("▁" + w for w in WORDS)]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def tiny(layers: int = 3, tie: bool = True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(llama_tokenizer()), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 270, (3, 12), generator=g)} for _ in range(2)]


def rotary_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Transformers' q/k rows (each head: first halves, then second halves) in GGUF's interleaved order."""
    rows = w.shape[0] // heads
    out = torch.empty_like(w)
    for h in range(heads):
        block = w[h * rows:(h + 1) * rows]
        out[h * rows:(h + 1) * rows][0::2] = block[: rows // 2]
        out[h * rows:(h + 1) * rows][1::2] = block[rows // 2:]
    return out


def expected_tensors(model) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor as llama.cpp's Llama layout holds it (torch's (out, in) order)."""
    sizes = layer_sizes(model)["layers"]
    out = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    if not model.config.tie_word_embeddings:
        out["output.weight"] = model.lm_head.weight
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i, block in enumerate(model.model.layers):
        for hf, short in names.items():
            module = block.get_submodule(hf)
            w = module.weight.detach()
            if short == "attn_q":
                w = rotary_pairs(w, sizes[i]["num_attention_heads"])
            if short == "attn_k":
                w = rotary_pairs(w, sizes[i]["num_key_value_heads"])
            out[f"blk.{i}.{short}.weight"] = w
            if getattr(module, "bias", None) is not None:
                out[f"blk.{i}.{short}.bias"] = module.bias.detach()
    return out


def read_back(path: Path) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        tensors[t.name] = (t.tensor_type.name, data)
    return fields, tensors


def check_file(path: Path, model, arch: str, step: float) -> dict:
    fields, tensors = read_back(path)
    want = expected_tensors(model)
    assert fields["general.architecture"] == arch
    assert set(tensors) == set(want)
    for name, w in want.items():
        _kind, data = tensors[name]
        assert data.shape == tuple(w.shape), name
        tol = 1e-3 if w.dim() == 1 else step  # norms stay F32; weights in the chosen type
        w = w.detach().float()
        np.testing.assert_allclose(data, w.numpy(), atol=tol * float(w.abs().max()), rtol=0, err_msg=name)
    return fields


def test_a_per_layer_plan_reads_back_exactly_as_llama_cpps_deci_model(tmp_path):
    tree = converter()
    model = tiny()
    keep = plan_units(model, unit_scores(model, batches(), "rc"), 0.35, scope="global", round_to=1)
    sizes = shrink_units(model, keep, bias_delta={"model.layers.1.mlp.down_proj": torch.ones(32)})
    assert len({json.dumps(s) for s in sizes["layers"]}) > 1  # the layers differ
    assert save_shrunk(model, llama_tokenizer(), tmp_path / "small") is False
    path = G.export_gguf(tmp_path / "small", tmp_path / "small.gguf", llama_cpp=tree)
    fields = check_file(path, model, "deci", 2 ** -10)
    layers = sizes["layers"]
    assert fields["deci.attention.head_count"] == [s["num_attention_heads"] for s in layers]
    assert fields["deci.attention.head_count_kv"] == [s["num_key_value_heads"] for s in layers]
    assert fields["deci.feed_forward_length"] == [s["intermediate_size"] for s in layers]
    assert fields["deci.block_count"] == 3 and fields["deci.attention.key_length"] == 8
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing staged left behind


def test_dropped_blocks_and_uniform_widths_convert_as_a_plain_llama_in_q8_0(tmp_path):
    tree = converter()
    model = tiny(layers=4, tie=False)
    remove_blocks(model, [1, 2])
    keep = plan_units(model, unit_scores(model, batches(), "rc"), 0.3, scope="uniform")
    shrink_units(model, keep)
    assert save_shrunk(model, llama_tokenizer(), tmp_path / "small") is True
    path = G.export_gguf(tmp_path / "small", tmp_path / "small.gguf", gguf_type="q8_0", llama_cpp=tree)
    fields = check_file(path, model, "llama", 2 ** -6)
    assert fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == layer_sizes(model)["layers"][0]["num_attention_heads"]


def test_llm_shrink_writes_the_gguf_file_inside_its_folder_and_refuses_to_shrink_twice(tmp_path, capsys):
    tree = converter()
    src = tmp_path / "tiny"
    tiny().save_pretrained(src)
    llama_tokenizer().save_pretrained(src)
    g = torch.Generator().manual_seed(1)
    text = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=g).tolist())
    (tmp_path / "calib.txt").write_text(text)
    args = ["llm", "shrink", "--model", str(src), "--ratio", "0.3", "--scope", "global", "--calibration",
            str(tmp_path / "calib.txt"), "--calibration-samples", "4", "--seqlen", "16", "--gguf", "f16",
            "--llama-cpp", str(tree), "--out", str(tmp_path / "out")]
    assert cli(args) == 0
    assert "model-f16.gguf" in capsys.readouterr().out
    model = relprune.llm.structured.load_shrunk(tmp_path / "out")
    check_file(tmp_path / "out" / "model-f16.gguf", model, "deci", 2 ** -10)
    manifest = json.loads((tmp_path / "out" / "relprune-manifest.json").read_text())
    assert "model-f16.gguf" in manifest["sha256"]
    again = [*args[:-1], str(tmp_path / "again")]
    again[again.index(str(src))] = str(tmp_path / "out")
    assert cli(again) == 1
    assert "already shrunk" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _shrunk_folder(tmp_path: Path, arch: str = "LlamaForCausalLM", layers=None) -> Path:
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "num_hidden_layers": 2}))
    layers = layers or [{"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 8},
                        {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 5}]
    (folder / "relprune_sizes.json").write_text(json.dumps({"head_dim": 8, "layers": layers}))
    return folder


@pytest.mark.parametrize("case, match", [
    ("gemma", "only as Llama blocks"),
    ("no ffn", "every layer needs a feed-forward unit"),
    ("uneven groups", "whole key/value groups"),
    ("type", "GGUF type must be one of"),
    ("suffix", "must end in .gguf"),
    ("exists", "exists"),
    ("no converter", "converter is not here"),
    ("not a tree", "is not a llama.cpp source tree"),
    ("no quantize", "llama-quantize"),
])
def test_plans_types_and_converters_llama_cpp_cannot_use_are_refused_before_writing(tmp_path, monkeypatch, case,
                                                                                     match):
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(G.CONVERTER_ENV, raising=False)
    monkeypatch.setenv(G.QUANTIZE_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    fake_tree = tmp_path / "tree"
    for part in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py"):
        (fake_tree / part).parent.mkdir(parents=True, exist_ok=True)
        (fake_tree / part).write_text("")
    layers = {"no ffn": [{"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 0}] * 2,
              "uneven groups": [{"num_attention_heads": 3, "num_key_value_heads": 2, "intermediate_size": 4}] * 2}
    folder = _shrunk_folder(tmp_path, "Gemma3ForCausalLM" if case == "gemma" else "LlamaForCausalLM",
                            layers.get(case))
    out = tmp_path / ("model.bin" if case == "suffix" else "model.gguf")
    if case == "exists":
        out.write_text("earlier")
    kwargs = {"llama_cpp": None if case == "no converter" else (tmp_path if case == "not a tree" else fake_tree),
              "gguf_type": {"type": "q4_k_x", "no quantize": "q4_k_m"}.get(case, "f16")}
    with pytest.raises(G.GGUFError, match=match):
        G.export_gguf(folder, out, **kwargs)
    assert (out.read_text() == "earlier") if case == "exists" else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _fake_sdist(tmp_path: Path) -> Path:
    archive = tmp_path / "src" / f"llama_cpp_python-{G.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        root = f"llama_cpp_python-{G.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"
        for part, text in (("convert_hf_to_gguf.py", "# converter"), ("conversion/__init__.py", ""),
                           ("gguf-py/gguf/__init__.py", ""), ("src/llama.cpp", "// not the converter")):
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{part}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def _fake_pip(tmp_path: Path, archive: Path | None) -> tuple[str, ...]:
    """A stand-in for ``python -m pip``: ``download ... --dest D spec`` copies the archive into D (or fails)."""
    script = tmp_path / "fake_pip.py"
    script.write_text(
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        f"assert args[0] == 'download' and args[-1] == 'llama-cpp-python=={G.LLAMA_CPP_PYTHON_VERSION}'\n"
        f"src = {str(archive) if archive else None!r}\n"
        "if src is None:\n"
        "    sys.exit('ERROR: Could not find a version that satisfies the requirement')\n"
        "shutil.copy(src, args[args.index('-d') + 1])\n")
    return (sys.executable, str(script))


def test_fetch_converter_keeps_only_the_converter_in_the_cache_and_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(G.CONVERTER_ENV, raising=False)
    with pytest.raises(G.GGUFError, match=r"could not fetch .*satisfies the requirement"):
        G.fetch_converter(pip=_fake_pip(tmp_path, None))
    assert not G.cache_dir().exists()
    got = G.fetch_converter(pip=_fake_pip(tmp_path, _fake_sdist(tmp_path)))
    assert got == G.cache_dir() and G.converter_dir() == got
    assert (got / "convert_hf_to_gguf.py").read_text() == "# converter"
    assert not (got / "src").exists()
    assert [p.name for p in got.parent.iterdir()] == [got.name]  # no staging left
