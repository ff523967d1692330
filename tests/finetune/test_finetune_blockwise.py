"""`moec finetune --blockwise`: one decoder layer at a time against the float layer's outputs. Training lowers
every block's reconstruction error, the sharded output checkpoint loads and evaluates with its learned
parameters, and a budget that only fits one layer is trained block-wise (the whole mode refuses it)."""

from __future__ import annotations

import json

import pytest
import torch

from moec.core.plan import resolve_plan
from moec.models.checkpoint import load_checkpoint
from moec.models.lazy import LazyCheckpoint
from moec.models.memory_budget import BASELINE, GB, layer_float32_bytes
from moec.quant.packed_model import fake_quantize_model
from tests.cli_helpers import assert_one_line_error, run

FAST = ["--steps", "8", "--batch", "2", "--seq-len", "32", "--max-tokens", "330", "--group-size", "16", "--lr", "1e-3",
        "--scale-lr", "1e-2"]


def test_blockwise_lowers_each_block_error_and_writes_a_checkpoint_eval_uses(ckpt):
    out = ckpt / "out"
    code, text = run("finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:2", "--blockwise",
                     "--out", out, *FAST)
    assert code == 0, text
    assert "rel. error" in text and "peak memory" in text
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["mode"] == "blockwise"
    blocks = rec["result"]["blocks"]
    assert [b["block"] for b in blocks] == ["layer 0", "layer 1", "head"]
    for b in blocks[:-1]:
        assert b["rel_error_after"] < b["rel_error_before"], b
    assert blocks[-1]["kl_after"] < blocks[-1]["kl_before"]
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()

    src, tuned = load_checkpoint(ckpt / "src"), load_checkpoint(out)
    plan = resolve_plan("uniform:2", src.cfg, 16)
    # every planned weight has learned parameters at its width, which packing uses
    names = {n for n, _ in tuned.learned_quant.params}
    assert all(tuned.learned_quant.get(n, 2, 16) is not None for n in names) and len(names) > 10
    assert any(not torch.equal(a, b) for a, b in zip(src.state_dict().values(), tuned.state_dict().values()))
    ids = torch.tensor([[5, 17, 42, 9, 100, 7, 63, 2]])
    with torch.no_grad():
        ref = fake_quantize_model(load_checkpoint(ckpt / "src"), plan)(ids)
        got = fake_quantize_model(load_checkpoint(out), plan)(ids)
        fp = src(ids)
    assert torch.nn.functional.mse_loss(got, fp) < torch.nn.functional.mse_loss(ref, fp)  # closer to float than PTQ
    code, text = run("eval", out, "--data", ckpt / "data.txt", "--plan", "uniform:2", "--group-size", "16",
                     "--seq-len", "32")
    assert code == 0 and "top-1" in text, text


def test_a_budget_of_one_layer_trains_blockwise_only(ckpt, tmp_path):
    layer, other = layer_float32_bytes(LazyCheckpoint(ckpt / "src"))
    budget = f"{(BASELINE + 2 * max(layer, other) + 4096) / GB:.12f}"
    args = ["finetune", ckpt / "src", "--data", ckpt / "data.txt", "--plan", "uniform:3", "--max-memory-gb", budget,
            "--steps", "1", *FAST[2:10]]
    code, text = run(*args, "--out", tmp_path / "whole")
    assert_one_line_error(code, text, "pass --blockwise")
    assert not (tmp_path / "whole").exists()
    code, text = run(*args, "--blockwise", "--out", tmp_path / "block")
    assert code == 0, text
    code, text = run(*args, "--blockwise", "--save-every", "1", "--out", tmp_path / "never")
    assert_one_line_error(code, text, "--save-every applies to whole-model")


def test_families_converted_on_save_cannot_be_written_layer_by_layer():
    from moec.core.config import MoEConfig
    from moec.core.errors import MoecError
    from moec.models.registry import get_adapter
    cfg = MoEConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, num_experts=4, top_k=2,
                    expert_intermediate=32, attention="mla", kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=8,
                    v_head_dim=8, architecture="DeepseekV2ForCausalLM")
    with pytest.raises(MoecError, match="cannot be written one layer at a time"):
        get_adapter(cfg.architecture).to_hf_part(cfg, {"norm.weight": torch.ones(32)})
