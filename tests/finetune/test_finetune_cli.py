"""`moec finetune` from the command line: output, and every bad input as one line (last good checkpoint kept)."""

from __future__ import annotations

import json

import torch

from moec.core.plan import uniform_plan
from moec.finetune import trainer
from moec.models.learned_quant import LEARNED_QUANT_FILE
from tests.cli_helpers import assert_one_line_error, run
from tests.conftest import make_tiny_checkpoint

FAST = ["--steps", "2", "--batch", "2", "--seq-len", "32", "--group-size", "16"]


def test_finetune_writes_a_checkpoint_eval_uses(ckpt):
    out = ckpt / "out"
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3", "--shift-robust",
                     "--out", out, *FAST)
    assert code == 0, text
    assert "peak memory" in text and "time" in text
    assert (out / LEARNED_QUANT_FILE).is_file()
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["step"] == 2 and rec["shift"] == "neighbours"
    code, text = run("eval", out, "--data", ckpt / "data.txt", "--plan", "uniform:3", "--group-size", "16",
                     "--seq-len", "32")
    assert code == 0 and "top-1" in text, text
    # the layer-by-layer path does not read learned parameters: it refuses rather than ignores them
    from moec.models.lazy import LazyCheckpoint
    from moec.models.memory_budget import BASELINE, GB, layer_float32_bytes
    layer, other = layer_float32_bytes(LazyCheckpoint(out))
    budget = (BASELINE + 2 * max(layer, other) + 4096) / GB
    code, text = run("eval", out, "--data", ckpt / "data.txt", "--plan", "uniform:3", "--group-size", "16",
                     "--seq-len", "32", "--max-memory-gb", f"{budget:.12f}")
    assert_one_line_error(code, text, "learned quantization parameters")
    # a re-run may replace its own output; the input checkpoint is never the output
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3",
                     "--out", ckpt / "src", *FAST)
    assert_one_line_error(code, text, "is the input checkpoint")


def test_data_too_short_for_one_batch(ckpt, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox.")
    code, text = run("finetune", ckpt / "src", "--data", short, "--plan", "uniform:2", "--out", tmp_path / "o",
                     *FAST)
    assert_one_line_error(code, text, "training data too short")
    assert not (tmp_path / "o").exists()


def test_plan_for_another_model(ckpt, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", hidden_size=32, expert_intermediate=32, num_experts=8)
    plan = tmp_path / "plan.json"
    uniform_plan(other, 4, 16).save(plan)
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", plan, "--out", tmp_path / "o",
                     *FAST)
    assert_one_line_error(code, text, "plan")
    assert not (tmp_path / "o").exists()


def test_needs_a_plan_or_shift_robust(ckpt, tmp_path):
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--out", tmp_path / "o", *FAST)
    assert_one_line_error(code, text, "--plan")


def test_nan_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(ckpt, tmp_path, monkeypatch):
    real, calls = trainer.kl_loss, []

    def nan_on_third(s, t):
        calls.append(1)
        loss = real(s, t)
        return loss * torch.tensor(float("nan")) if len(calls) == 3 else loss

    monkeypatch.setattr(trainer, "kl_loss", nan_on_third)
    out = tmp_path / "o"
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:2", "--out", out,
                     "--steps", "4", "--save-every", "2", *FAST[2:])
    assert_one_line_error(code, text, "loss is nan at step 3; the last good checkpoint (step 2) is kept")
    assert json.loads((out / "finetune.json").read_text())["step"] == 2
    assert (out / LEARNED_QUANT_FILE).is_file()


def test_profile_weights_the_shifted_widths(ckpt, tmp_path):
    import numpy as np

    from moec.models.checkpoint import load_config
    from moec.profile.stats import ExpertStats, LayerStats
    cfg = load_config(ckpt / "src")

    def profile(fingerprint, path):
        st = ExpertStats(fingerprint, cfg.num_experts, cfg.top_k, tokens=10)
        for layer in cfg.moe_layers:
            st.layers[layer] = LayerStats.zeros(cfg.num_experts)
            st.layers[layer].counts = np.arange(cfg.num_experts, dtype=float)
        st.save(path)
        return path

    good = profile(cfg.fingerprint(), tmp_path / "p.json")
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3", "--out",
                     tmp_path / "o", "--profile", good, *FAST)
    assert_one_line_error(code, text, "--profile weights the shifted widths; it needs --shift-robust")
    bad = profile("0123456789abcdef", tmp_path / "bad.json")
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3", "--shift-robust",
                     "--out", tmp_path / "o", "--profile", bad, *FAST)
    assert_one_line_error(code, text, "is for another model")
    assert not (tmp_path / "o").exists()
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3", "--shift-robust",
                     "--out", tmp_path / "o", "--profile", good, *FAST)
    assert code == 0, text
    assert json.loads((tmp_path / "o" / "finetune.json").read_text())["shift_weights"] == "routing-frequency"


def test_plan_weight_needs_shift_robust_and_is_recorded(ckpt, tmp_path):
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3", "--out",
                     tmp_path / "o", "--plan-weight", "1", *FAST)
    assert_one_line_error(code, text, "--plan-weight adds the plan's own KL")
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3", "--shift-robust",
                     "--blockwise", "--out", tmp_path / "o", "--plan-weight", "1", *FAST)
    assert_one_line_error(code, text, "not --blockwise")
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3", "--shift-robust",
                     "--out", tmp_path / "o", "--plan-weight", "-1", *FAST)
    assert code != 0 and not (tmp_path / "o").exists()
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3", "--shift-robust",
                     "--out", tmp_path / "o", "--plan-weight", "1", *FAST)
    assert code == 0, text
    assert json.loads((tmp_path / "o" / "finetune.json").read_text())["plan_weight"] == 1.0
