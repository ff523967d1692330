"""Plan memory accounting equals the bytes of the packed tensors; fake quant applies the plan."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from moec.cli.main import cli
from moec.models.checkpoint import load_checkpoint
from moec.quant.accounting import float32_memory, plan_memory
from moec.quant.fake import fake_quantize
from moec.quant.packed_model import fake_quantize_model, pack_model
from moec.core.plan import BitPlan, uniform_plan


def _mixed(cfg) -> BitPlan:
    bits = [2, 3, 4, 8, 16]
    experts = {l: {e: bits[(l + e) % 5] for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    return BitPlan(experts, {"attention": 8, "lm_head": 4, "embeddings": 16}, group_size=32,
                   model_fingerprint=cfg.fingerprint())


def test_reported_bytes_equal_packed_tensor_bytes(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    for plan in (uniform_plan(model.cfg, 4, group_size=32), _mixed(model.cfg)):
        packed = pack_model(model, plan)
        one_d = sum(t.numel() * 4 for t in model.state_dict().values() if t.dim() == 1)
        assert plan_memory(model, plan).total == sum(p.nbytes for p in packed.values()) + one_d
    assert float32_memory(model) == sum(p.numel() * 4 for p in model.parameters())


def test_fake_quantize_model_quantizes_each_expert_at_its_bits(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _mixed(model.cfg)
    fake_quantize_model(model, plan)
    st = model.state_dict()
    for l, experts in plan.experts.items():
        for e, bits in experts.items():
            w = ref[f"layers.{l}.mlp.w1"][e]
            if bits == 16:
                expected = w.half().float()
            else:
                expected = fake_quantize(w, bits, 32)
                assert len(torch.unique(st[f"layers.{l}.mlp.w1"][e][0, :32])) <= 2 ** bits
            torch.testing.assert_close(st[f"layers.{l}.mlp.w1"][e], expected, rtol=0, atol=0)
    # the router stays float (float16 storage), attention at 8 bits is quantized
    assert torch.equal(st["layers.0.mlp.router.weight"], ref["layers.0.mlp.router.weight"].half().float())
    assert not torch.equal(st["layers.0.attn.q_proj.weight"], ref["layers.0.attn.q_proj.weight"])


def test_eval_cli_uniform_and_mixed_plan(tiny_checkpoint, text_file, tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    plan_file = tmp_path / "mixed.json"
    plan_file.write_text(json.dumps(_mixed(model.cfg).to_json()))
    results = {}
    for spec in ("uniform:8", "uniform:2", str(plan_file)):
        res = CliRunner().invoke(cli, ["eval", str(tiny_checkpoint), "--data", str(text_file), "--plan", spec,
                                       "--seq-len", "32", "--json"])
        assert res.exit_code == 0, res.output
        results[spec] = json.loads(res.output)
    fp = json.loads(CliRunner().invoke(cli, ["eval", str(tiny_checkpoint), "--data", str(text_file),
                                             "--seq-len", "32", "--json"]).output)
    assert results["uniform:2"]["weight_bytes"] < results["uniform:8"]["weight_bytes"] < fp["weight_bytes"]
    # 8-bit barely moves the loss; 2-bit moves it more
    assert abs(results["uniform:8"]["nll"] - fp["nll"]) < abs(results["uniform:2"]["nll"] - fp["nll"])
    assert np.isclose(results[str(plan_file)]["weight_bytes"], plan_memory(model, _mixed(model.cfg)).total)


def test_eval_cli_bad_plan_is_one_line(tiny_checkpoint, text_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "experts": {"7": {"0": 4}}}')
    res = CliRunner().invoke(cli, ["eval", str(tiny_checkpoint), "--data", str(text_file), "--plan", str(bad)])
    assert res.exit_code != 0
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1
