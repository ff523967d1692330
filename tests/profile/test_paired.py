"""Per-token scores and the paired window bootstrap (moec.profile.paired) against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moec.core.errors import MoecError
from moec.models.checkpoint import load_checkpoint
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import token_windows
from moec.profile.evaluate import evaluate_windows, score_tokens
from moec.profile.paired import paired


def test_token_scores_match_evaluate_windows_and_cross_entropy(tiny_checkpoint, text_file):
    model = load_checkpoint(tiny_checkpoint)
    w = token_windows(load_tokenizer(tiny_checkpoint), text_file.read_text(), 16)
    s = score_tokens(model, w, batch=3)
    assert s.nll.shape == s.correct.shape == (len(w), 16)
    with torch.no_grad():
        logits = model(w[:, :-1])
    want = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
    assert torch.allclose(s.nll, want, atol=1e-5)
    assert torch.equal(s.correct, logits.argmax(-1) == w[:, 1:])
    r, ref = s.result(), evaluate_windows(model, w, batch=3)
    assert r.tokens == ref.tokens and math.isclose(r.top1, ref.top1) and math.isclose(r.nll, ref.nll, rel_tol=1e-6)


def test_paired_difference_counts_and_recovered_share():
    n, t = 40, 10
    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, t, generator=g) < 0.5
    b = a.clone()
    b[:20, 0] = True      # b also right where a was wrong on some tokens ...
    b[30:, 1] = False     # ... and wrong on a few a got
    ref = torch.ones(n, t, dtype=torch.bool)
    nll_a = torch.rand(n, t, generator=g)
    nll_b = nll_a - 0.1
    p = paired(a, b, nll_a, nll_b, ref_correct=ref, samples=500)
    gain, loss = int((b & ~a).sum()), int((a & ~b).sum())
    assert (p.b_only, p.a_only) == (gain, loss) and p.tokens == n * t and p.windows == n
    diff = (gain - loss) / (n * t)
    assert p.top1_diff == pytest.approx(diff) and p.top1_lo <= diff <= p.top1_hi and p.top1_se > 0
    assert p.nll_diff == pytest.approx(-0.1) and p.nll_lo == pytest.approx(-0.1) and p.nll_hi == pytest.approx(-0.1)
    drop = 1 - a.double().mean()
    assert p.recovered == pytest.approx(diff / float(drop))
    assert p.recovered_lo <= p.recovered <= p.recovered_hi
    # identical models: no difference and a degenerate interval
    same = paired(a, a, nll_a, nll_a)
    assert same.top1_diff == 0 and same.top1_lo == same.top1_hi == 0 and same.b_only == same.a_only == 0
    assert math.isnan(same.recovered)


def test_paired_mean_over_plans_and_bad_shapes():
    a = torch.zeros(3, 4, 5, dtype=torch.bool)
    b = a.clone()
    b[0, :, 0] = True                      # one of three plans gains one token per window
    z = torch.zeros(3, 4, 5)
    p = paired(a, b, z, z, samples=100)
    assert p.top1_diff == pytest.approx(1 / 15) and p.b_only == pytest.approx(4 / 3)
    with pytest.raises(MoecError, match="one shape"):
        paired(a, b[:2], z, z)
    with pytest.raises(MoecError, match="at least 2 windows"):
        paired(a[:, :1], b[:, :1], z[:, :1], z[:, :1])
    with pytest.raises(MoecError, match="reference scores"):
        paired(a, b, z, z, ref_correct=torch.ones(4, 4, dtype=torch.bool))
