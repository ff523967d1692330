"""Double-quantized (``u8``) group scales: numpy reference of the dequantized weights, exact bytes, plan
JSON, fake quantization equal to the packed weights, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moec.core.errors import MoecError
from moec.core.formats import SCALE_FORMATS, get_scale_format
from moec.core.plan import BitPlan, resolve_plan
from moec.models.checkpoint import load_checkpoint
from moec.quant.accounting import plan_memory
from moec.quant.pack import packed_nbytes, unpack
from moec.quant.packed_model import fake_quantize_model, pack_model, pack_weight
from moec.quant.quantize import dequantize, quantize


def _weight(n=24, k=160, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)) * (0.01 + rng.random((n, 1)))).astype(np.float32)


def _reference_dequant(q, codes, sup, zero, gs, sg):
    """Naive loops: w[n, i] = (q - zero[g]) * (codes[g] * sup[g // sg]) in float32."""
    out = np.zeros(q.shape, np.float32)
    for n in range(q.shape[0]):
        for i in range(q.shape[1]):
            g = i // gs
            s = np.float32(codes[n, g]) * np.float32(sup[n, g // sg])
            out[n, i] = np.float32(np.float32(q[n, i]) - np.float32(zero[n, g])) * s
    return out


@pytest.mark.parametrize("bits,gs", [(4, 32), (3, 32), (2, 16), (8, 32)])
@pytest.mark.parametrize("method", ["rtn", "mse", "hqq"])
def test_u8_scales_match_the_naive_reference(bits, gs, method):
    w = _weight()
    qt = quantize(w, bits, gs, method, scales="u8")
    sg = SCALE_FORMATS["u8"].super_groups
    groups = w.shape[1] // gs
    assert qt.scale.dtype == np.uint8 and qt.scale.shape == (24, groups) and qt.scale.min() >= 1
    assert qt.super_scale.dtype == np.float16 and qt.super_scale.shape == (24, -(-groups // sg))
    ref = _reference_dequant(qt.q, qt.scale, qt.super_scale, qt.zero, gs, sg)
    np.testing.assert_array_equal(dequantize(qt), ref)
    # codes are exactly the rounding against the stored scale and zero (no clipping beyond the grid)
    s = ref_scale = qt.scale.astype(np.float32) * np.repeat(qt.super_scale.astype(np.float32), sg, 1)[:, :groups]
    expect = np.clip(np.rint(w.reshape(24, groups, gs) / s[..., None]) + qt.zero[..., None], 0, (1 << bits) - 1)
    np.testing.assert_array_equal(qt.q.reshape(24, groups, gs), expect.astype(np.uint8))
    assert ref_scale.max() <= 255 * qt.super_scale.astype(np.float32).max()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_u8_refit_is_no_worse_than_the_quantized_scales_alone(bits):
    """The re-fit (codes ±1, zeros around the rescaled zero) beats keeping the method's zero with the
    rounded scale, and stays within a few per cent of the fp16-scale error at a fraction of the bytes."""
    w = _weight(64, 256, seed=bits)
    fp = quantize(w, bits, 32, "mse")
    dq = quantize(w, bits, 32, "mse", scales="u8")
    err_fp = ((dequantize(fp) - w) ** 2).sum()
    err_dq = ((dequantize(dq) - w) ** 2).sum()
    assert err_dq <= 1.05 * err_fp
    assert packed_nbytes(64, 256, bits, 32, "u8")["scales"] == 64 * 8 + 64 * 1 * 2
    assert packed_nbytes(64, 256, bits, 32, "u8")["scales"] < packed_nbytes(64, 256, bits, 32)["scales"]


def test_packed_weight_bytes_and_dequantize():
    w = _weight(16, 512)
    pw = pack_weight(w, 4, 32, "mse", scales="u8")
    nb = packed_nbytes(16, 512, 4, 32, "u8")
    assert pw.nbytes == nb["total"] == 16 * 256 + 16 * 16 + 16 * 2 * 2 + 16 * 8
    qt = quantize(w, 4, 32, "mse", scales="u8")
    np.testing.assert_array_equal(unpack(pw.packed, 4, 512), qt.q)
    np.testing.assert_array_equal(pw.dequantize(), dequantize(qt))
    np.testing.assert_array_equal(pw.float_scales(), qt.float_scales())


def test_scale_format_registry_and_bits_per_weight():
    u8 = get_scale_format("u8")
    assert u8.double_quantized and u8.kernels == {"x86", "arm"} and not get_scale_format("fp16").double_quantized
    # int4 at group 32: 4 + 8/32 (code) + 4/32 (zero) + 16/256 (super-scale) = 4.4375 bits per weight
    assert packed_nbytes(256, 4096, 4, 32, "u8")["total"] * 8 / (256 * 4096) == pytest.approx(4.4375)
    with pytest.raises(MoecError, match="unknown scale format"):
        get_scale_format("u6")


def test_plan_json_round_trip_and_cli_override(tiny_checkpoint, tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    plan = resolve_plan("uniform:4", model.cfg, 32, scales="u8")
    assert plan.scales == "u8" and plan.to_json()["scales"] == "u8"
    assert "scales" not in resolve_plan("uniform:4", model.cfg, 32).to_json()  # fp16 plans read as before
    plan.save(tmp_path / "p.json")
    assert BitPlan.load(tmp_path / "p.json").scales == "u8"
    assert resolve_plan(tmp_path / "p.json", model.cfg, scales="fp16").scales == "fp16"
    bad = plan.to_json() | {"scales": "u4"}
    with pytest.raises(MoecError, match="unknown scale format"):
        BitPlan.from_json(bad)


def test_fake_quant_equals_packed_weights_and_memory_is_exact(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    plan = resolve_plan("uniform:4", model.cfg, 16, scales="u8")  # K = 64: 4 groups, one super-block
    packed = pack_model(model, plan)
    mem = plan_memory(model, plan)
    assert mem.total == sum(p.nbytes for p in packed.values()) + mem.kind_total("norms/bias")
    assert mem.total < plan_memory(model, resolve_plan("uniform:4", model.cfg, 16)).total
    fake_quantize_model(model, plan)
    w = dict(model.named_parameters())["layers.0.attn.q_proj.weight"]
    assert torch.equal(w, torch.from_numpy(packed["layers.0.attn.q_proj.weight"].dequantize()))
    e = dict(model.named_parameters())["layers.1.mlp.w2"][3]
    assert torch.equal(e, torch.from_numpy(packed["layers.1.mlp.experts.3.w2"].dequantize()))


def test_u8_scales_refuse_gptq_and_learned_scales():
    w = _weight(8, 64)
    with pytest.raises(MoecError, match="not supported with method 'gptq'"):
        pack_weight(w, 4, 32, "gptq", hessian=np.eye(64), scales="u8")
    with pytest.raises(MoecError, match="learned"):
        pack_weight(w, 4, 32, learned=(np.ones((8, 2), np.float16), np.zeros((8, 2), np.uint8)), scales="u8")


def test_quant_cache_keeps_u8_scales_apart_and_exact(tmp_path):
    from moec.quant.cache import QuantCache
    cache = QuantCache(tmp_path / "qc")
    w = _weight(16, 256)
    first = pack_weight(w, 4, 32, "mse", cache=cache, scales="u8")
    fp16 = pack_weight(w, 4, 32, "mse", cache=cache)  # same weight and group, another key
    again = pack_weight(w, 4, 32, "mse", cache=cache, scales="u8")
    assert (cache.misses, cache.hits) == (2, 1)
    assert fp16.super_scale is None and again.scales == "u8"
    for a in ("packed", "scale", "zero", "super_scale"):
        np.testing.assert_array_equal(getattr(again, a), getattr(first, a))


def test_eval_cli_counts_u8_bytes(tiny_checkpoint, text_file):
    import json as _json
    from click.testing import CliRunner
    from moec.cli.main import cli
    args = ["eval", str(tiny_checkpoint), "--data", str(text_file), "--plan", "uniform:4", "--group-size", "16",
            "--json", "--max-tokens", "128", "--seq-len", "64"]
    u8 = CliRunner().invoke(cli, args + ["--scales", "u8"])
    assert u8.exit_code == 0, u8.output
    model = load_checkpoint(tiny_checkpoint)
    want = plan_memory(model, resolve_plan("uniform:4", model.cfg, 16, scales="u8")).total
    assert _json.loads(u8.output)["weight_bytes"] == want < plan_memory(model, resolve_plan("uniform:4", model.cfg, 16)).total
    bad = CliRunner().invoke(cli, args + ["--scales", "u4"])
    assert bad.exit_code != 0
