"""Layer-sequential profile, proxy sensitivity and eval equal the whole-model results, one layer resident."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import moec.models.memory_budget as budget
from moec import api
from moec.core.errors import MoecError
from moec.models.checkpoint import load_checkpoint
from moec.models.lazy import LazyCheckpoint
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import token_windows
from moec.profile.evaluate import evaluate_windows
from moec.profile.routing import collect_stats
from moec.profile.sensitivity import proxy_sensitivity
from moec.profile.sequential import evaluate_sequential, profile_sequential, run_sequential
from moec.quant.packed_model import fake_quantize_model
from moec.core.plan import resolve_plan
from tests.conftest import TEXT


@pytest.fixture
def windows(tiny_checkpoint):
    return token_windows(load_tokenizer(tiny_checkpoint), TEXT, 32, None)


def test_profile_and_proxy_equal_whole_model(tiny_checkpoint, windows):
    model = load_checkpoint(tiny_checkpoint)
    whole = collect_stats(model, windows, batch=4)
    proxy = proxy_sensitivity(model, windows, [2, 4], 64, "rtn", batch=4)
    stats, seq_proxy = profile_sequential(LazyCheckpoint(tiny_checkpoint), windows, 4, ((2, 4), 64, "rtn"))
    assert stats.tokens == whole.tokens
    for layer, s in whole.layers.items():
        np.testing.assert_array_equal(stats.layers[layer].counts, s.counts)
        np.testing.assert_allclose(stats.layers[layer].contrib_sum, s.contrib_sum, rtol=1e-6)
        np.testing.assert_allclose(seq_proxy[layer], proxy[layer], rtol=1e-6, atol=1e-12)
        assert proxy[layer].max() > 0


@pytest.mark.parametrize("budget_bytes", [None, 1])  # 1 byte: hidden states spill to a file
def test_eval_under_plan_equals_whole_model(tiny_checkpoint, windows, budget_bytes):
    model = load_checkpoint(tiny_checkpoint)
    plan = resolve_plan("uniform:3", model.cfg, 32, "mse")
    res = evaluate_sequential(LazyCheckpoint(tiny_checkpoint), windows, plan, 4, budget_bytes)
    ref = evaluate_windows(fake_quantize_model(model, plan), windows, batch=4)
    assert res.tokens == ref.tokens and res.top1 == ref.top1
    assert res.nll == pytest.approx(ref.nll, rel=1e-6)


def test_eval_under_a_plan_with_knobs_equals_whole_model(tiny_checkpoint, windows):
    """Router temperature, dropped and merged experts: the layer-by-layer eval applies them as the whole model does."""
    model = load_checkpoint(tiny_checkpoint)
    plan = resolve_plan("uniform:4", model.cfg, 32, "rtn")
    plan.router_temperature, plan.dropped_experts, plan.merged_experts = 1.3, {1: [2]}, {0: [(3, 1, 0.25)]}
    plan.validate(model.cfg)
    res = evaluate_sequential(LazyCheckpoint(tiny_checkpoint), windows, plan, 4, None)
    ref = evaluate_windows(fake_quantize_model(model, plan), windows, batch=4)
    plain = evaluate_windows(fake_quantize_model(load_checkpoint(tiny_checkpoint), resolve_plan(
        "uniform:4", model.cfg, 32, "rtn")), windows, batch=4)
    assert res.tokens == ref.tokens and res.top1 == ref.top1
    assert res.nll == pytest.approx(ref.nll, rel=1e-6) and abs(res.nll - plain.nll) > 1e-4


def test_one_layer_resident(tiny_checkpoint, windows):
    """When layer i is read, no tensor of layer i-1 is alive (weakrefs to modules and mapped buffers)."""
    lazy = LazyCheckpoint(tiny_checkpoint)
    previous, live_at_read = [], []

    def before(i, layer):
        gc.collect()
        assert all(ref() is None for ref in previous)
        previous.append(weakref.ref(layer))
        live_at_read.append(lazy.live_tensors())

    run_sequential(lazy, windows[:, :-1], 4, before).close()
    gc.collect()
    assert lazy.live_tensors() == 0
    assert live_at_read[0] == live_at_read[1] > 0  # only the layer being run, never two


def test_api_profile_sequential_with_layer_local_exact(tiny_checkpoint, text_file, monkeypatch):
    data = api.DataConfig(text_file, seq_len=32, batch=4)
    sens = api.SensitivityConfig("both", (2, 4), 64, "rtn")
    whole = api.profile(tiny_checkpoint, data, progress=False, sensitivity=sens)
    monkeypatch.setattr(budget, "WHOLE_MODEL_LIMIT", 0)
    seq = api.profile(tiny_checkpoint, data, progress=False, sensitivity=sens)
    assert seq.sensitivity["exact_form"] == "layer-local"
    for layer in whole.layers:
        np.testing.assert_allclose(seq.sensitivity["proxy"][str(layer)], whole.sensitivity["proxy"][str(layer)],
                                   rtol=1e-6, atol=1e-12)
    # held-out = calibration text here, so the layer-local exact form equals the proxy
    assert seq.sensitivity["exact"] == seq.sensitivity["proxy"]


def test_budget_too_small_fails_before_reading(tiny_checkpoint, text_file):
    with pytest.raises(MoecError, match=r"--max-memory-gb 0.1 is too small for eval .* one decoder layer"):
        api.evaluate(tiny_checkpoint, api.DataConfig(text_file, max_memory_gb=0.1))
