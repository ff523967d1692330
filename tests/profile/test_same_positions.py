"""llama.cpp-style scoring: chunks of n_ctx ids, only the second half of each window scored."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.models.model import MoEModel
from moec.profile.data import context_chunks
from moec.profile.evaluate import evaluate_windows


@pytest.fixture(scope="module")
def model() -> MoEModel:
    torch.manual_seed(0)
    cfg = MoEConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, num_experts=2,
                    top_k=1, expert_intermediate=32, rms_eps=1e-5)
    return MoEModel(cfg).eval()


def test_chunks_drop_the_tail_and_replace_the_first_id_with_bos():
    ids = list(range(1, 24))
    c = context_chunks(ids, 8)
    assert c.tolist() == [list(range(1, 9)), list(range(9, 17))]  # 7 leftover ids dropped
    b = context_chunks(ids, 8, bos=0)
    assert b[:, 0].tolist() == [0, 0] and b[:, 1:].tolist() == c[:, 1:].tolist()
    for bad in (1, True):
        with pytest.raises(MoecError, match="context length"):
            context_chunks(ids, bad)
    with pytest.raises(MoecError, match="do not fill"):
        context_chunks(ids[:5], 8)


def test_score_from_scores_exactly_the_second_half(model):
    torch.manual_seed(1)
    chunks = context_chunks(torch.randint(0, 50, (3 * 16 + 5,)).tolist(), 16)
    half = evaluate_windows(model, chunks, batch=2, score_from=8)
    assert half.tokens == 3 * (16 - 1 - 8)  # llama-perplexity: n_ctx - 1 - n_ctx/2 per chunk
    with torch.no_grad():
        logits = model(chunks)  # the full window: causal, so positions < 15 equal the scored forward
    nll = F.cross_entropy(logits[:, 8:15].flatten(0, 1), chunks[:, 9:].flatten()).item()
    assert math.isclose(half.nll, nll, rel_tol=1e-5)
    full = evaluate_windows(model, chunks, batch=2)
    assert full.tokens == 3 * 15 and not math.isclose(full.nll, half.nll, rel_tol=1e-6)
    for bad in (-1, 15, True):
        with pytest.raises(MoecError, match="score_from"):
            evaluate_windows(model, chunks, score_from=bad)
