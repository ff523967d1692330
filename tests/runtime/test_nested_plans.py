"""Nested bundles: one bundle serves 2/3/4/8-bit expert plans switched at run time (issue 13).

One nested bundle (``moec compile --nested 8``) and one reference bundle compiled directly for the
derived weights (float16 experts, reference emitter) are built once for the module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.core.plan import BitPlan, uniform_plan
from moec.core.targets import load_target
from moec.lower.bundler import build_bundle
from moec.models.checkpoint import load_checkpoint
from tests.runtime.nested_fixtures import GS, derived_model as _derived_model, mixed_plan as _mixed

pytestmark = pytest.mark.tvm

@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("nested")
    ckpt = root / "ckpt"
    cfg = make_tiny_checkpoint(ckpt, seed=3)
    plan_file = root / "mixed.json"
    plan_file.write_text(json.dumps(_mixed(cfg).to_json()))
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--plan", "uniform:8", "--group-size", str(GS),
                                   "--method", "rtn", "--nested", "8", "--out", str(root / "nested"),
                                   "--activations", "float32"])
    assert res.exit_code == 0, res.output
    # the same plan compiled directly: the derived expert weights kept in float (fp16), the reference emitter
    direct = _derived_model(ckpt, _mixed(cfg))
    fixed = uniform_plan(cfg, 8, GS)
    fixed.experts = {layer: {e: 16 for e in experts} for layer, experts in fixed.experts.items()}
    model = load_checkpoint(ckpt)
    with torch.no_grad():
        for name, p in direct.named_parameters():
            if ".mlp.w" in name:
                dict(model.named_parameters())[name].copy_(p)
    build_bundle(model, fixed, load_target("host"), root / "direct", ckpt / "tokenizer.json", use_kernels=False)
    return ckpt, plan_file, root / "nested", root / "direct"


def test_a_plan_served_nested_equals_the_bundle_compiled_for_its_derived_weights(bundles):
    from moec.runtime.session import BundleSession
    ckpt, plan_file, nested, direct = bundles
    with BundleSession(nested) as sess, BundleSession(direct) as ref:
        prompt = sess.tokenizer.encode("Experts in a mixture").ids
        assert sess.plan.average_expert_bits() == 8
        switch = sess.set_plan(plan_file)
        assert switch.changed == 6 and switch.average_bits == pytest.approx(4.25)
        got, stats = sess.generate(prompt, 12)
        assert got == ref.generate(prompt, 12)[0]
        assert stats.average_bits == pytest.approx(4.25)
        model = _derived_model(ckpt, BitPlan.load(plan_file))
        assert got == model.generate_greedy(prompt, 12)
        sess.reset()
        logits = sess.prefill(prompt)
        want = model(torch.tensor([prompt]))[0, -1].detach().numpy()
        np.testing.assert_allclose(logits, want, atol=2e-4 * float(np.abs(want).max()))


def _prefill_and_steps(sess, prompt):
    """(prefill logits, its cache) and (the last decode step's logits, its cache) of ``prompt``."""
    sess.reset()
    got = sess.prefill(prompt)
    cache = sess.kv_cache()
    sess.reset()
    for t in prompt:
        want = sess.step(t)
    return (got, cache), (want, sess.kv_cache())


def test_nested_prefill_equals_decode_steps_under_the_plan_in_force(bundles):
    """The nested bundle prefills in one call (nested grouped GEMMs reading the same width tables as
    decode): the logits and cache of step-by-step decode, under a mixed plan and after ``set_plan``."""
    from moec.runtime.session import BundleSession
    _, plan_file, nested, _ = bundles
    with BundleSession(nested) as sess:
        assert sess.has_prefill
        prompt = sess.tokenizer.encode("Experts in a mixture route every token").ids
        last = None
        for plan in (plan_file, "uniform:2", "uniform:8"):
            sess.set_plan(plan)
            (got, cache), (want, steps) = _prefill_and_steps(sess, prompt)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            for a, b in zip(cache, steps):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            assert last is None or not np.allclose(got, last, atol=1e-3)  # the new plan is the one served
            last = got
        sess.set_plan(plan_file)  # a switch between two prefill chunks: the second chunk under the new plan
        sess.reset()
        sess.prefill(prompt[:4])
        sess.set_plan("uniform:3")
        chunked = sess.prefill(prompt[4:])
        sess.reset()
        sess.set_plan(plan_file)
        for t in prompt[:4]:
            sess.step(t)
        sess.set_plan("uniform:3")
        for t in prompt[4:]:
            want = sess.step(t)
        np.testing.assert_allclose(chunked, want, rtol=1e-4, atol=1e-4)
        sess.reset()
        want = sess.step(prompt[0])
        sess.reset()
        np.testing.assert_allclose(sess.prefill(prompt[:1]), want, rtol=1e-4, atol=1e-4)  # a one-token prompt


def test_switching_keeps_the_cache_and_bad_plans_keep_the_plan_in_force(bundles, tmp_path):
    from moec.runtime.session import BundleSession
    ckpt, plan_file, nested, _ = bundles
    with BundleSession(nested) as sess, BundleSession(nested) as steady:
        prompt = sess.tokenizer.encode("Experts in a mixture").ids
        for s in (sess, steady):
            s.set_plan(plan_file)
            s.prefill(prompt)
        full = sess.expert_bytes()
        tables = {i: sess.params[i] for i in sess._table_index.values()}
        sess.set_plan("uniform:2")  # a switch and back between two steps: the KV cache is untouched
        assert sess.expert_bytes() < full
        for i, tensor in tables.items():  # written in place: the same device buffers
            assert sess.params[i] is tensor and set(tensor.numpy().tolist()) == {2}
        sess.set_plan(plan_file)
        assert np.array_equal(sess.step(7), steady.step(7))
        other = uniform_plan(load_checkpoint(ckpt).cfg, 8, GS).to_json()
        other["model_fingerprint"] = "0123456789abcdef"
        bad_expert = BitPlan.load(plan_file).to_json()
        bad_expert["experts"]["0"]["9"] = 4
        too_wide = tmp_path / "wide.json"
        wide = BitPlan.load(plan_file)
        wide.experts[1][2] = 16
        wide.save(too_wide)
        for plan, message in [("uniform:5", "layer 0 expert 0: 5 bits cannot be served from nested8 storage "
                                            r"\(it serves 2, 3, 4, 8\)"),
                              (too_wide, "layer 1 expert 2: 16 bits cannot be served"),
                              (bad_expert, "plan names expert 9 of layer 0; the model has experts 0..3"),
                              (other, "plan is for another model")]:
            with pytest.raises(MoecError, match=message) as err:
                sess.set_plan(plan)
            assert "\n" not in str(err.value)
            assert sess.plan.average_expert_bits() == pytest.approx(4.25)
        assert len(sess.switches) == 3
        assert np.array_equal(sess.step(9), steady.step(9))  # still generating under the plan in force


def test_moec_run_shows_the_plan_and_its_switches(bundles):
    _, plan_file, nested, direct = bundles
    res = CliRunner().invoke(cli, ["run", str(nested), "--prompt", "Experts", "--max-new-tokens", "6", "--verbose",
                                   "--plan", str(plan_file), "--switch", "3:uniform:2"])
    assert res.exit_code == 0, res.output
    assert "plan in force: mean 4.25 bits" in res.output
    assert "switch at step 3: 6 expert(s) changed, mean 2.00 bits" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(nested)])
    assert "nested: routed experts stored once at 8 bits, each served at 2/3/4/8 bits" in res.output
    res = CliRunner().invoke(cli, ["run", str(direct), "--prompt", "Experts", "--plan", "uniform:2"])
    assert res.exit_code != 0
    assert res.output.strip().splitlines()[-1] == ("error: this bundle's plan is fixed at compile time; compile it "
                                                   "with --nested 8 to switch expert widths at run time")


def test_nested_compile_errors_are_one_line(bundles, tmp_path):
    ckpt = bundles[0]
    for extra, message in [(["--plan", "uniform:8", "--onnx", str(tmp_path / "onnx")],
                            "error: --onnx cannot export a nested bundle's storage"),
                           (["--plan", "uniform:16"], "error: layer 0 expert 0: 16 bits cannot be served from nested8"),
                           (["--plan", "uniform:8", "--nested", "4"], "error: layer 0 expert 0: 8 bits cannot be served "
                                                                      "from nested4 storage (it serves 2, 3, 4)")]:
        args = ["compile", str(ckpt), "--out", str(tmp_path / "b"), "--group-size", str(GS), *extra]
        if "--nested" not in extra:
            args += ["--nested", "8"]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0
        assert res.output.strip().splitlines()[-1].startswith(message), res.output
        assert not (tmp_path / "b").exists()


def test_memory_budget_evicts_the_coldest_experts_first(bundles):
    from moec.runtime.adapt import memory_plan, parse_adapt
    from moec.runtime.session import BundleSession
    _, _, nested, _ = bundles
    with BundleSession(nested) as sess:
        sess.set_plan("uniform:8")
        full = sess.expert_bytes()
        sess.set_plan("uniform:2")
        narrow = sess.expert_bytes()
        budget = (full + narrow) / 2
        freq = {0: np.array([0.1, 0.9, 0.5, 0.3]), 1: np.array([0.7, 0.2, 0.6, 0.4])}
        plan = memory_plan(sess._model_cfg, sess.plan, 8, sess._per_expert, budget, freq)
        sess.set_plan(plan)
        assert sess.expert_bytes() <= budget
        widths = {(l, e): b for l, row in plan.experts.items() for e, b in row.items()}
        order = sorted(widths, key=lambda x: freq[x[0]][x[1]])
        assert [widths[x] for x in order] == sorted(widths[x] for x in order)  # colder never wider
        assert widths[order[0]] == 2 and widths[order[-1]] == 8
        with pytest.raises(MoecError, match="below the narrowest plan's"):
            sess.memory_plan(narrow - 1)
    assert parse_adapt("memory:1.5") == ("memory", 1.5e6) and parse_adapt("latency:30") == ("latency", 0.03)
    assert parse_adapt("energy:0.02") == ("energy", 0.02)
    with pytest.raises(MoecError, match="energy:J"):
        parse_adapt("power:2")
    res = CliRunner().invoke(cli, ["run", str(nested), "--prompt", "Experts", "--max-new-tokens", "3", "--verbose",
                                   "--adapt", f"memory:{budget / 1e6}"])
    assert res.exit_code == 0, res.output
    assert "plan in force: mean" in res.output


def test_latency_controller_moves_along_the_ladder(bundles):
    from moec.runtime.adapt import LatencyController
    from moec.runtime.session import BundleSession
    _, _, nested, _ = bundles
    with BundleSession(nested) as sess:
        ladder = sess.plan_ladder(4)
    bits = [p.average_expert_bits() for p in ladder]
    assert bits[0] == 8 and bits[-1] == 2 and bits == sorted(bits, reverse=True)
    ctl = LatencyController(ladder, target_s=0.010, window=4)
    moves = [ctl.observe(t) for t in [0.02] * 8 + [0.009] * 4 + [0.005] * 4]
    assert [m is not None for m in moves] == [False, False, False, True] * 2 + [False] * 4 + [False, False, False, True]
    assert moves[3] is ladder[1] and moves[7] is ladder[2] and moves[15] is ladder[1]  # slow: narrower; fast: wider
    res = CliRunner().invoke(cli, ["run", str(nested), "--prompt", "Experts", "--max-new-tokens", "12", "--verbose",
                                   "--adapt", "latency:0.001"])  # a target no step meets: one rung narrower a window
    assert res.exit_code == 0, res.output
    assert "switch at step 9:" in res.output


def test_the_plan_front_is_in_the_manifest_and_energy_picks_from_it(bundles):
    """``plan_front``: computed at compile time with the search's energy model, checked by the schema,
    served by ``--adapt energy:J`` (the widest plan within the budget)."""
    from moec.artifact.manifest_schema import check_manifest
    from moec.core.config import config_from_dict
    from moec.hardware.energy_model import decode_energy_j
    from moec.runtime.session import BundleSession
    _, _, nested, _ = bundles
    with BundleSession(nested) as sess:
        front = sess.plan_front()
        manifest = json.loads((nested / "manifest.json").read_text())
        cfg = config_from_dict(sess.cfg, "test")
        preset = load_target(manifest["target"]["name"])
        bits = [p.average_expert_bits() for p, _ in front]
        assert len(front) >= 3 and bits[0] == 8 and bits[-1] == 2 and bits == sorted(bits, reverse=True)
        energies = [c["energy_j"] for _, c in front]
        assert energies == sorted(energies, reverse=True) and energies[0] > energies[-1]
        for plan, cost in front:  # no profile in this bundle: uniform routing, as the search assumes
            assert cost["energy_j"] == pytest.approx(decode_energy_j(cfg, plan, preset.energy_model))
        budget = (energies[1] + energies[2]) / 2
        assert sess.energy_plan(budget).experts == front[2][0].experts
        with pytest.raises(MoecError, match="below the narrowest plan's modelled"):
            sess.energy_plan(energies[-1] / 2)
    res = CliRunner().invoke(cli, ["run", str(nested), "--prompt", "Experts", "--max-new-tokens", "2", "--verbose",
                                   "--adapt", f"energy:{budget}"])
    assert res.exit_code == 0, res.output
    assert f"plan in force: mean {bits[2]:.2f}" in res.output, res.output
    check_manifest(manifest, "ok")
    manifest["plan_front"][0]["experts"]["0"][0] = 5
    with pytest.raises(MoecError, match=r"plan_front\[0\]\.experts"):
        check_manifest(manifest, "bundle")


def test_drift_is_measured_from_the_decode_steps_and_replans_at_the_same_bytes(bundles, tmp_path):
    """Forced drift: the calibration reference is the reverse of the routing the prompt really gets."""
    from moec.runtime.adapt import DriftController, DriftMonitor
    from moec.runtime.session import BundleSession
    _, _, nested, _ = bundles
    with BundleSession(nested) as sess:
        cfg = sess._model_cfg
        layers = list(cfg.moe_layers)
        sess.set_plan(_mixed(cfg))
        seen = []

        class Recorder:  # what a monitor is fed: every decode call's routed ids
            def observe(self, routed):
                seen.append(routed.copy())

        sess.drift = Recorder()
        prompt = sess.tokenizer.encode("Experts route tokens").ids
        sess.generate(prompt, 8)
        routed = np.stack(seen)  # [decode calls, MoE layers, top_k]
        n = len(routed)
        assert n >= 7 and routed.shape == (n, len(layers), cfg.top_k)
        assert ((routed >= 0) & (routed < cfg.num_experts)).all()
        assert all(len(set(row)) == cfg.top_k for step in routed for row in step)  # top-k: distinct experts
        counts = {l: np.bincount(routed[:, i].ravel(), minlength=cfg.num_experts) / n for i, l in enumerate(layers)}
        same = DriftMonitor(layers, cfg.num_experts, counts, window=n)
        for step in routed:
            same.observe(step)
        assert same.distance == pytest.approx(0.0) and not same.drifted
        reverse = {l: counts[l].max() - counts[l] + 1e-3 for l in layers}  # the rarely routed were "hot"
        before = sess.expert_bytes()
        sess.drift = monitor = DriftMonitor(layers, cfg.num_experts, reverse, window=n, threshold=0.2)
        ctl = DriftController(sess, monitor)
        replans = []

        def on_token(t):
            plan = ctl.observe(0.0)
            if plan is not None:
                replans.append(plan)
                sess.set_plan(plan)

        sess.generate(prompt, 8, on_token=on_token)
        q = {l: reverse[l] / reverse[l].sum() for l in layers}
        tv = np.mean([0.5 * np.abs(counts[l] / cfg.top_k - q[l]).sum() for l in layers])
        assert monitor.distance == pytest.approx(tv) and tv > 0.2 and len(replans) == 1
        assert sess.expert_bytes() <= before  # same bytes (or fewer)
        widths = {(l, e): b for l, row in sess.plan.experts.items() for e, b in row.items()}
        hot = sorted(widths, key=lambda x: counts[x[0]][x[1]])
        assert [widths[x] for x in hot] == sorted(widths[x] for x in hot)  # online-hotter never narrower
        assert monitor.online[layers[0]] == pytest.approx(counts[layers[0]])
    res = CliRunner().invoke(cli, ["run", str(nested), "--prompt", "Experts", "--max-new-tokens", "4",
                                   "--adapt", "drift:0.3"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["run", str(nested), "--prompt", "Experts", "--adapt", "drift:1.5"])
    assert res.exit_code != 0 and "drift:TV" in res.output.strip().splitlines()[-1]


def test_nested_bundle_applies_expert_biases_and_the_clamped_glu(tmp_path):
    """A gpt-oss-like model (expert biases, clamped SwiGLU): the nested bundle at 8 bits (the stored weights
    themselves) prefills and decodes as the torch model fake-quantized at 8 bits."""
    from moec.core.config import MoEConfig
    from moec.models.model import MoEModel
    from moec.quant.packed_model import fake_quantize_model
    from moec.runtime.session import BundleSession
    cfg = MoEConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                    top_k=2, expert_intermediate=32, expert_bias=True, swiglu_limit=0.3, attention_out_bias=True)
    torch.manual_seed(0)
    model = MoEModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.08)
    plan = uniform_plan(cfg, 8, GS)
    prompt = [5, 17, 3, 42, 8, 61, 2]
    with BundleSession(build_bundle(model, plan, load_target("host"), tmp_path / "nested", None, nested=8,
                                    activations="float32")) as sess:
        want = fake_quantize_model(model, plan)(torch.tensor([prompt]))[0].detach().numpy()
        assert sess.has_prefill
        np.testing.assert_allclose(sess.prefill(prompt), want[-1], rtol=1e-4, atol=1e-4)
        sess.reset()
        for i, t in enumerate(prompt):
            np.testing.assert_allclose(sess.step(t), want[i], rtol=1e-4, atol=1e-4)
