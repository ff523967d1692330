"""A layer kind defined only in ``moec.arch`` runs unchanged in torch, onnxruntime and the TVM bundle."""

from __future__ import annotations

import numpy as np
import pytest

from moec.arch import blocks
from moec.export.exporter import export_model
from moec.export.ort_runner import OrtModel
from moec.quant.weights import ModelWeights
from moec.core.targets import load_target
from moec.lower.bundler import build_bundle_from_params
from moec.lower.params import build_params
from moec.models.model import DecoderLayer
from moec.quant.packed_model import fake_quantize_model
from moec.runtime.session import BundleSession
from moec.core.plan import BitPlan
from tests.export.export_fixtures import LOGIT_TOL, PROMPT, feature_model, torch_logits

pytestmark = pytest.mark.tvm


def parallel_layer(ops, cfg, layer, x):
    """GPT-J-style parallel residual: attention and MLP both read the layer input."""
    a = ops.block("attn", blocks.attention, cfg, layer, ops.rms_norm(x, "attn_norm"))
    mlp = blocks.swiglu if layer in cfg.dense_layers else blocks.moe
    m = ops.block("mlp", mlp, cfg, layer, ops.rms_norm(x, "mlp_norm"))
    return ops.add(ops.add(x, a), m)


def _use(monkeypatch, layer_fn) -> None:
    """Select ``layer_fn`` as the decoder layer: the blocks' and the torch module's one definition."""
    monkeypatch.setattr(blocks, "decoder_layer", layer_fn)
    monkeypatch.setattr(DecoderLayer, "block_fn", staticmethod(layer_fn))


def test_new_layer_kind_defined_once_runs_in_all_backends(tmp_path, monkeypatch):
    model = feature_model("shared_gate_bias_dense_fullnorm")
    cfg, cycle = model.cfg, [2, 4, 8, 16]  # widths with grouped-GEMM kernels, so the bundle has prefill
    experts = {l: {e: cycle[(l + e) % len(cycle)] for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    plan = BitPlan(experts, {"router": 16, "shared_gate": 16, "attention": 8, "re:.*": 4}, 16, "rtn",
                   cfg.fingerprint()).validate(cfg)
    weights = ModelWeights.from_model(model, plan)
    export_model(model, plan, tmp_path / "onnx")  # the standard layer
    with monkeypatch.context() as m:
        _use(m, parallel_layer)
        export_model(model, plan, tmp_path / "onnx_parallel")
        params = build_params(model.cfg, plan, weights.packed, weights.floats)
        bundle = build_bundle_from_params(model.cfg, plan, params, load_target("host"), tmp_path / "b", None,
                                          activations="float32")  # exact: compared with torch below
    fake_quantize_model(model, plan)
    standard = torch_logits(model, PROMPT)
    with monkeypatch.context() as m:
        _use(m, parallel_layer)
        ref = torch_logits(model, PROMPT)
    assert np.abs(ref - standard).max() > 1e-2  # the variant really ran

    got, _ = OrtModel(tmp_path / "onnx_parallel").prefill(PROMPT)
    assert np.abs(got - ref).max() < LOGIT_TOL
    old, _ = OrtModel(tmp_path / "onnx").prefill(PROMPT)
    assert np.abs(old - standard).max() < LOGIT_TOL

    sess = BundleSession(bundle)
    assert sess.has_prefill
    np.testing.assert_allclose(np.ravel(sess.prefill(PROMPT)), ref[0, -1], atol=LOGIT_TOL, rtol=0)
    sess.reset()
    for t in PROMPT:
        step = sess.step(t)
    np.testing.assert_allclose(np.ravel(step), ref[0, -1], atol=LOGIT_TOL, rtol=0)
