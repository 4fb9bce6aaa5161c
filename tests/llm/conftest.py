"""The tiny Hugging Face folder the language-model tests share (built from a config, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the llm extra is not installed")

from tiny import WORDS, tiny_llama, tiny_tokenizer


@pytest.fixture
def folder(tmp_path) -> Path:
    """A tiny Llama and its tokenizer saved as a Hugging Face folder, plus text files."""
    out = tmp_path / "tiny"
    tiny_llama().save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    g = torch.Generator().manual_seed(1)
    for name, n in (("calib.txt", 3000), ("eval.txt", 1000)):
        ids = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        (tmp_path / name).write_text(" ".join(WORDS[i] for i in ids))
    return out
