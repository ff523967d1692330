"""Layer-streaming compile and export: same bundle numerics as the whole-model path, one layer resident."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

import moec.models.memory_budget as budget
from moec import api
from moec.cli.main import cli
from moec.models.checkpoint import load_checkpoint
from moec.models.lazy import LazyCheckpoint
from moec.quant.packed_model import fake_quantize_model
from moec.runtime.session import BundleSession
from moec.core.plan import BitPlan


def _mixed_plan(cfg) -> BitPlan:
    bits = (2, 4, 8, 4)
    experts = {l: {e: bits[(e + l) % 4] for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    return BitPlan(experts, {"attention": 8, "lm_head": 8, "embeddings": 8}, 64, "rtn")


def test_streamed_bundle_matches_whole_model(tiny_checkpoint, tmp_path, monkeypatch):
    model = load_checkpoint(tiny_checkpoint)
    plan = _mixed_plan(model.cfg)
    live = []
    real_release = LazyCheckpoint.release

    def release(self):
        import gc
        gc.collect()
        live.append(self.live_tensors())
        real_release(self)

    monkeypatch.setattr(LazyCheckpoint, "release", release)
    monkeypatch.setattr(budget, "WHOLE_MODEL_LIMIT", 0)
    stages = []
    cache = tmp_path / "quant-cache"  # the streamed compile fills it, the whole-model one reads it back
    streamed = api.compile_bundle(api.CompileConfig(tiny_checkpoint, tmp_path / "new" / "s", plan=plan,
                                                    quant_cache=cache), on_stage=lambda n, t: stages.append(n))
    assert live and max(live) == 0  # every layer's float tensors were freed before the next was read
    monkeypatch.setattr(budget, "WHOLE_MODEL_LIMIT", 1 << 40)
    whole = api.compile_bundle(api.CompileConfig(tiny_checkpoint, tmp_path / "w", plan=plan, quant_cache=cache),
                               on_stage=lambda n, t: stages.append(n))
    counts = [tuple(map(int, m.groups())) for m in map(re.compile(r"cache (\d+) hit / (\d+) miss").search, stages) if m]
    assert len(counts) == 2 and counts[0][0] == 0 and counts[0][1] > 0 and counts[1] == counts[0][::-1], stages
    ms, mw = (json.loads((p / "manifest.json").read_text()) for p in (streamed, whole))
    assert ms["streamed"] and ms["weight_bytes"] == mw["weight_bytes"]
    assert ms["stored_weight_bytes"] == mw["stored_weight_bytes"]
    assert {"weights.bin", "weights.json"} <= set(ms["files"]) and all(len(f["sha256"]) == 64 for f in ms["files"].values())
    ref = fake_quantize_model(model, plan).generate_greedy([3, 1, 4, 1, 5], 10)
    for bundle in (streamed, whole):
        with BundleSession(bundle) as s:
            s.eos = None
            assert s.generate([3, 1, 4, 1, 5], 10)[0] == ref


def test_streamed_export_equals_whole_export(tiny_checkpoint, tmp_path, monkeypatch):
    from moec.export.ort_runner import OrtModel

    monkeypatch.setattr(budget, "WHOLE_MODEL_LIMIT", 0)
    a = api.export_onnx(tiny_checkpoint, "uniform:4", tmp_path / "a")
    monkeypatch.setattr(budget, "WHOLE_MODEL_LIMIT", 1 << 40)
    b = api.export_onnx(tiny_checkpoint, "uniform:4", tmp_path / "b")
    assert a.summary["streamed"] and a.summary["bytes"] == b.summary["bytes"]
    ids = [5, 6, 7, 8, 9]
    la, _ = OrtModel(a.out_dir).prefill(ids)
    lb, _ = OrtModel(b.out_dir).prefill(ids)
    np.testing.assert_array_equal(la, lb)


def test_budget_error_leaves_no_bundle(tiny_checkpoint, tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["compile", str(tiny_checkpoint), "--plan", "uniform:4", "--out", str(out),
                                   "--max-memory-gb", "0.2"])
    assert res.exit_code != 0 and "too small for compile" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_unusable_quant_cache_is_one_line(tiny_checkpoint, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["compile", str(tiny_checkpoint), "--plan", "uniform:4", "--out", str(out),
                                   "--quant-cache", str(tmp_path / "file" / "cache")])
    assert res.exit_code != 0 and "cannot create quantization cache" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_layer_sequential_gptq(tiny_checkpoint, text_file, tmp_path, monkeypatch):
    """GPTQ on the streaming path: Hessians of each layer's routed float inputs, as expert_hessians computes."""
    from moec.models.tokenizer import load_tokenizer
    from moec.profile.data import token_windows
    from moec.profile.importance import expert_hessians
    from moec.core.plan import resolve_plan

    model = load_checkpoint(tiny_checkpoint)
    plan = resolve_plan("uniform:3", model.cfg, 32, "gptq")
    data = api.DataConfig(text_file, seq_len=32, batch=4)
    windows = token_windows(load_tokenizer(tiny_checkpoint), text_file.read_text(), 32, None)
    monkeypatch.setattr(budget, "WHOLE_MODEL_LIMIT", 0)
    with pytest.raises(Exception, match="gptq needs calibration text"):
        api.compile_bundle(api.CompileConfig(tiny_checkpoint, tmp_path / "x", plan=plan))
    bundle = api.compile_bundle(api.CompileConfig(tiny_checkpoint, tmp_path / "g", plan=plan, data=data))
    hess = expert_hessians(model, windows, batch=4)
    gptq = fake_quantize_model(load_checkpoint(tiny_checkpoint), plan, hessians=hess).generate_greedy([3, 1, 4, 1, 5], 10)
    rtn_plan = resolve_plan("uniform:3", model.cfg, 32, "rtn")
    with BundleSession(bundle) as s:
        s.eos = None
        got = s.generate([3, 1, 4, 1, 5], 10)[0]
    assert got == gptq
    from moec.artifact.weights_file import WeightsReader
    r = WeightsReader(bundle)
    name = next(n for n in r.order if ".experts." in n)
    rtn_bundle = api.compile_bundle(api.CompileConfig(tiny_checkpoint, tmp_path / "r", plan=rtn_plan))
    assert not np.array_equal(r.array(name), WeightsReader(rtn_bundle).array(name))
    assert json.loads((bundle / "manifest.json").read_text())["plan"]["method"] == "gptq"


def test_streamed_nested_bundle_equals_whole_model(tmp_path, monkeypatch):
    """``--nested 8`` layer by layer: the same weights.bin tensors (bit for bit), plan at load, profile
    and plan front as the whole-model path, and the same tokens under the plan at load and after a switch."""
    from moec.artifact.weights_file import WeightsReader
    from moec.runtime.adapt import profile_frequencies
    from tests.conftest import TEXT, make_tiny_checkpoint
    from tests.runtime.nested_fixtures import GS, mixed_plan

    ckpt = tmp_path / "ckpt"
    plan = mixed_plan(make_tiny_checkpoint(ckpt, seed=4))
    text = tmp_path / "calib.txt"  # a few windows: the profile's frequencies order the plan front
    text.write_text(TEXT[:400])
    data = api.DataConfig(text, seq_len=32, batch=4)
    bundles = {}
    for name, limit in (("streamed", 0), ("whole", 1 << 40)):
        monkeypatch.setattr(budget, "WHOLE_MODEL_LIMIT", limit)
        bundles[name] = api.compile_bundle(api.CompileConfig(ckpt, tmp_path / name, plan=plan, data=data,
                                                             group_size=GS, nested=8))
    ms, mw = (json.loads((bundles[n] / "manifest.json").read_text()) for n in ("streamed", "whole"))
    assert ms["streamed"] and "streamed" not in mw
    for key in ("nested", "plan", "plan_front", "weight_bytes", "stored_weight_bytes", "entry"):
        assert ms[key] == mw[key], key
    assert ms["entry"] == {n: n for n in ("decode", "prefill", "decode_resident", "prefill_resident")}
    freqs = [profile_frequencies(bundles[n] / "profile.json") for n in ("streamed", "whole")]
    assert freqs[0].keys() == freqs[1].keys() and all(np.allclose(freqs[0][l], freqs[1][l]) for l in freqs[0])
    rs, rw = WeightsReader(bundles["streamed"]), WeightsReader(bundles["whole"])
    assert sorted(rs.order) == sorted(rw.order) and any(".experts.nested.w1.kseg3" in n for n in rs.order)
    for name in rs.order:
        a, b = rs.array(name), rw.array(name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    prompt = [3, 1, 4, 1, 5]
    with BundleSession(bundles["streamed"]) as s, BundleSession(bundles["whole"]) as w:
        for sess in (s, w):
            sess.eos = None
        assert s.generate(prompt, 8)[0] == w.generate(prompt, 8)[0]
        for sess in (s, w):
            sess.set_plan("uniform:2")
        assert s.generate(prompt, 8)[0] == w.generate(prompt, 8)[0]
