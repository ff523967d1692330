"""Prefill (one call, grouped-GEMM experts) equals token-by-token decode on models with every feature."""

from __future__ import annotations

import numpy as np
import pytest

from moec.quant.weights import ModelWeights
from moec.core.targets import load_target
from moec.lower.bundler import build_bundle_from_params
from moec.lower.params import build_params
from moec.runtime.session import BundleSession
from moec.core.plan import BitPlan
from tests.export.export_fixtures import FEATURE_CONFIGS, feature_model

pytestmark = pytest.mark.tvm


def _plan(cfg) -> BitPlan:
    cycle = [2, 4, 8, 16]
    experts = {l: {e: cycle[(l + e) % len(cycle)] for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    return BitPlan(experts, {"router": 16, "shared_gate": 16, "attention": 8, "re:.*": 4}, 16, "rtn",
                   cfg.fingerprint())


@pytest.mark.parametrize("name", sorted(FEATURE_CONFIGS))
def test_prefill_matches_decode_steps(name, tmp_path):
    model = feature_model(name)
    cfg, plan = model.cfg, _plan(model.cfg)
    weights = ModelWeights.from_model(model, plan)
    params = build_params(cfg, plan, weights.packed, weights.floats)
    sess = BundleSession(build_bundle_from_params(cfg, plan, params, load_target("host"), tmp_path / "b", None,
                                                  activations="float32"))
    assert sess.has_prefill
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, 13)]
    want = _assert_prefill_equals_steps(sess, prompt, cache_atol=1e-5)
    sess.reset()
    sess.prefill(prompt[:5])  # a second chunk on top of a filled cache attends to it
    np.testing.assert_allclose(sess.prefill(prompt[5:]), want, rtol=1e-4, atol=1e-4)


def _assert_prefill_equals_steps(sess, prompt: list[int], cache_atol: float) -> np.ndarray:
    """One prefill of ``prompt`` gives the last logits and the cache of step-by-step decode; returns those logits."""
    got = sess.prefill(prompt)
    cache = sess.kv_cache()
    sess.reset()
    for t in prompt:
        want = sess.step(t)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(cache, sess.kv_cache(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=cache_atol)
    return want


@pytest.mark.parametrize("preset", ["host", "x86-64-v3"])
def test_int8_prefill_matches_int8_decode_steps(preset, tmp_path):
    """With int8 activations the prefill grouped GEMMs (VNNI on ``host``, AVX2 on ``x86-64-v3``) quantize each
    token's row as its decode GEMV does: the same logits and cache as step-by-step decode."""
    import platform

    from tvm.target import codegen
    from moec.lower.kernels.factory import host_target
    if preset == "host" and not codegen.target_has_features("avx512vnni", host_target()):
        pytest.skip("int8 activations need AVX-512 VNNI on this host")
    if preset == "x86-64-v3" and (platform.machine() != "x86_64" or not codegen.target_has_features("avx2", host_target())):
        pytest.skip("an x86 host with AVX2")
    model = feature_model("headnorm_tied_mqa")
    cfg = model.cfg
    plan = BitPlan(_plan(cfg).experts, {"router": 16, "re:.*": 4}, 16, "rtn", cfg.fingerprint())
    weights = ModelWeights.from_model(model, plan)
    params = build_params(cfg, plan, weights.packed, weights.floats)
    sess = BundleSession(build_bundle_from_params(cfg, plan, params, load_target(preset), tmp_path / "b", None,
                                                  activations="int8"))
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, cfg.vocab_size, 11)]
    _assert_prefill_equals_steps(sess, prompt, cache_atol=1e-4)


def test_no_prefill_without_kernels(tmp_path):
    """The reference emitter has no grouped GEMM: the bundle has decode only and still generates."""
    model = feature_model("headnorm_tied_mqa")
    cfg, plan = model.cfg, _plan(model.cfg)
    weights = ModelWeights.from_model(model, plan)
    params = build_params(cfg, plan, weights.packed, weights.floats)
    sess = BundleSession(build_bundle_from_params(cfg, plan, params, load_target("host"), tmp_path / "b", None,
                                                  use_kernels=False))
    assert not sess.has_prefill and list(sess.manifest["entry"]) == ["decode", "decode_resident"]
    ids, _ = sess.generate([5, 7, 11], 4)
    assert len(ids) == 4
