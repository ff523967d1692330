"""Sensitivity: the exact value equals a direct held-out measurement; the proxy tracks bits and routing."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from moec.api import DataConfig, SensitivityConfig, profile
from moec.models.checkpoint import load_checkpoint
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import token_windows
from moec.profile.sensitivity import Sensitivity, exact_sensitivity, proxy_sensitivity
from moec.profile.stats import ExpertStats
from moec.quant.fake import fake_quantize


def _setup(ckpt, text_file):
    model = load_checkpoint(ckpt)
    windows = token_windows(load_tokenizer(ckpt), text_file.read_text(), 32)[:6]
    return model, windows


def test_exact_equals_direct_measurement(tiny_checkpoint, text_file):
    model, windows = _setup(tiny_checkpoint, text_file)
    exact = exact_sensitivity(model, windows, [2, 8], group_size=32)

    def nll(m):
        with torch.no_grad():
            logits = m(windows[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()

    base = nll(model)
    layer, e = 1, 2
    block = model.layers[layer].mlp
    with torch.no_grad():
        for w in (block.w1, block.w3, block.w2):
            w[e].copy_(fake_quantize(w[e].clone(), 2, 32))
    assert abs(exact[layer][e, 0] - (nll(model) - base)) < 1e-5


def test_proxy_decreases_with_bits_and_is_zero_for_unrouted(tiny_checkpoint, text_file):
    model, windows = _setup(tiny_checkpoint, text_file)
    proxy = proxy_sensitivity(model, windows, [2, 3, 4, 8], group_size=32)
    for layer, res in proxy.items():
        assert (res >= 0).all()
        assert (res[:, 0] >= res[:, 3]).all()  # 2-bit distorts at least as much as 8-bit
        assert res[:, 0].sum() > res[:, 2].sum() > res[:, 3].sum()


def test_sensitivity_saved_with_profile(tiny_checkpoint, text_file, tmp_path):
    out = tmp_path / "stats.json"
    profile(tiny_checkpoint, DataConfig(text_file, seq_len=32, max_tokens=200), out=out, progress=False,
            sensitivity=SensitivityConfig("both", (2, 4), 32))
    stats = ExpertStats.load(out)
    sens = Sensitivity.from_json(stats.sensitivity)
    assert sens.bits == [2, 4] and set(sens.proxy) == set(sens.exact) == {0, 1}
    # the saved correlation is that of the saved tables, entry for entry (on a random tiny model its sign
    # means nothing; the reference model's 0.67 is in the README)
    flat = [np.concatenate([t[l].ravel() for l in sorted(t)]) for t in (sens.proxy, sens.exact)]
    assert math.isclose(stats.sensitivity["spearman"], spearmanr(*flat).statistic, abs_tol=1e-12)
