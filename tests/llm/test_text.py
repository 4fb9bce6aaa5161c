"""Text windows (llm.text) and perplexity (llm.perplexity)."""


from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")

from tiny import tiny_llama  # noqa: E402

import relprune  # noqa: E402
from relprune.llm import (  # noqa: E402
    calibration_windows,
    evaluation_windows,
    perplexity,
)


def test_perplexity_counts_every_predicted_token_once():
    model = tiny_llama()
    ids = torch.arange(2, 22).repeat(5)  # 100 tokens
    windows = evaluation_windows(ids, 16)
    assert windows.shape == (6, 16) and torch.equal(windows.flatten(), ids[:96])
    result = perplexity(model, windows, batch_size=4)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.tokens == 6 * 15 and result.value == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_calibration_windows_are_seeded_and_inside_the_text():
    ids = torch.arange(1000)
    a, b = calibration_windows(ids, 4, 32, seed=3), calibration_windows(ids, 4, 32, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, calibration_windows(ids, 4, 32, seed=4))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()
    with pytest.raises(relprune.DataError, match="fewer than one window"):
        calibration_windows(ids[:10], 1, 32)
