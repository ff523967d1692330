"""Decode graph: routed experts' gate and up projections as one int8 SwiGLU GEMV where the emitter has it."""

from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.target import codegen

from moec.core.plan import BitPlan
from moec.core.targets import load_target
from moec.lower.decode_graph import DecodeBuilder
from moec.lower.kernel_linear import KernelEmitter, apply_kernel_layout
from moec.lower.params import build_params
from moec.lower.pipeline import CPU_PHASES, make_pipeline
from moec.quant.weights import ModelWeights
from tests.export.export_fixtures import feature_model

pytestmark = [pytest.mark.tvm, pytest.mark.skipif(
    not codegen.target_has_features("avx512vnni", load_target("host").tvm()), reason="host CPU lacks AVX-512 VNNI")]


class UnfusedEmitter(KernelEmitter):
    """The same kernels without the fused gate/up call (the graph before it)."""

    def swiglu_experts(self, *args):
        return None


@pytest.fixture(scope="module")
def emitters():
    """(fused, unfused) int8 emitters for the host, shared so that each kernel is built once."""
    target = load_target("host").tvm()
    return KernelEmitter(target, "int8"), UnfusedEmitter(target, "int8")


def _params(model, bits_of):
    cfg = model.cfg
    plan = BitPlan({l: {e: bits_of(e) for e in range(cfg.num_experts)} for l in cfg.moe_layers},
                   {"attention": 8, "lm_head": 8, "embeddings": 8}, group_size=16, method="rtn",
                   model_fingerprint=cfg.fingerprint())
    weights = ModelWeights.from_model(model, plan)
    return build_params(cfg, plan, weights.packed, weights.floats)


def _decode(cfg, params, emitter):
    params = copy.deepcopy(params)
    apply_kernel_layout(params, emitter)
    mod = DecodeBuilder(cfg, params, emitter).build()
    return mod, params


def _gated_calls(script: str) -> tuple[int, int]:
    """(fused SwiGLU calls, unfused w1 GEMV calls) on routed expert stacks in the decode function."""
    fused = len(re.findall(r"\bswiglu_b\d+_n\d+_k\d+_g\d+_s\d+_t\d+_i8\b", script))
    w1 = len(re.findall(r"gemv_b\d+_[^(]*\([^)]*experts_b\d+_w1", script))
    return fused, w1


@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed"])
def test_routed_gate_up_is_one_call_per_class(emitters, mixed):
    model = feature_model("headnorm_tied_mqa")
    cfg = model.cfg
    params = _params(model, (lambda e: 4 if e % 2 else 8) if mixed else (lambda e: 4))
    classes = 2 if mixed else 1
    script = _decode(cfg, params, emitters[0])[0]["decode"].script()
    fused, w1 = _gated_calls(script)
    assert (fused, w1) == (classes * cfg.num_layers, 0)
    # the int8 GEMVs write 0 to rows of id -1 (moec.row_zero): no member masks around any expert call
    assert "R.greater_equal" not in script and "R.nn.silu" not in script
    fused, w1 = _gated_calls(_decode(cfg, params, emitters[1])[0]["decode"].script())
    assert (fused, w1) == (0, classes * cfg.num_layers)


def test_clamped_swiglu_and_expert_biases_keep_the_unfused_calls(emitters):
    """gpt-oss's clamped SwiGLU (``swiglu_limit``) and per-expert biases before it are not the kernel's epilogue."""
    model = feature_model("headnorm_tied_mqa")
    params = _params(model, lambda e: 4)
    for change in ({"swiglu_limit": 0.5}, {"expert_bias": True}):
        cfg = dataclasses.replace(model.cfg, **change)
        if cfg.expert_bias:  # the biases the graph adds after w1 and w3 (and w2)
            params.floats.update({f"layers.{l}.mlp.{w}_bias": np.zeros((cfg.num_experts, n), np.float32)
                                  for l in cfg.moe_layers
                                  for w, n in (("w1", cfg.expert_intermediate), ("w3", cfg.expert_intermediate),
                                               ("w2", cfg.hidden_size))})
        fused, w1 = _gated_calls(_decode(cfg, params, emitters[0])[0]["decode"].script())
        assert fused == 0 and w1 == cfg.num_layers, change


def test_fused_decode_step_matches_the_unfused_graph(emitters):
    """Mixed 4/8-bit classes (rows of id -1 in each class' call): the logits of a few steps agree with the unfused
    graph's to float rounding (same int8 dot sums; the SiLU epilogue rounds differently)."""
    model = feature_model("headnorm_tied_mqa", seed=2)
    params = _params(model, lambda e: 4 if e % 2 else 8)
    target = load_target("host").tvm()
    outs = []
    for emitter in emitters:
        mod, laid = _decode(model.cfg, params, emitter)
        with target:
            vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=make_pipeline(CPU_PHASES)),
                                      tvm.cpu())
        cfg = model.cfg
        dev = tvm.cpu()
        shapes = cfg.kv_cache_shapes()
        cache = [tvm.runtime.tensor(np.zeros((s[0], 8, s[1]), np.float32), dev)
                 for _ in range(cfg.num_layers) for s in shapes]
        weights = [tvm.runtime.tensor(a, dev) for _, a in laid.flat()]
        logits = []
        for pos, token in enumerate([5, 17, 3]):
            out = vm["decode"](tvm.runtime.tensor(np.array([token], np.int32), dev),
                               tvm.runtime.tensor(np.array([pos], np.int64), dev), *cache, *weights)
            logits.append(out[0].numpy())
        outs.append(np.stack(logits))
    fused, unfused = outs
    np.testing.assert_allclose(fused, unfused, rtol=1e-4, atol=1e-4 * float(np.abs(unfused).max()))
