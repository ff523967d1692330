"""Experts that calibration never reaches are still quantized (RTN fallback), never left in float."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from moec.models.checkpoint import load_checkpoint
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import token_windows
from moec.profile.routing import collect_stats
from moec.quant.fake import fake_quantize
from moec.profile.importance import expert_hessians
from moec.quant.packed_model import fake_quantize_model
from moec.core.plan import uniform_plan
from tests.conftest import make_tiny_checkpoint


def test_unreached_expert_is_quantized_with_rtn_fallback(tmp_path, text_file):
    ckpt = tmp_path / "top1"
    make_tiny_checkpoint(ckpt, top_k=1)
    t = load_file(str(ckpt / "model.safetensors"))
    gate = torch.zeros_like(t["model.layers.1.block_sparse_moe.gate.weight"])
    gate[0, 0], gate[1, 0], gate[2, 0] = 50.0, -50.0, 50.0  # expert 3 of layer 1 can never win
    t["model.layers.1.block_sparse_moe.gate.weight"] = gate
    save_file(t, str(ckpt / "model.safetensors"))
    model = load_checkpoint(ckpt)
    windows = token_windows(load_tokenizer(ckpt), text_file.read_text(), 32)
    assert (1, 3) in collect_stats(model, windows).never_activated()
    hessians = expert_hessians(model, windows)
    assert "layers.1.mlp.experts.3.w1" not in hessians
    original = model.layers[1].mlp.w1[3].detach().clone()
    plan = uniform_plan(model.cfg, 2, group_size=32, method="gptq")
    fake_quantize_model(model, plan, hessians=hessians)
    got = model.layers[1].mlp.w1[3].detach()
    assert not torch.equal(got, original)                        # not left in float
    assert torch.equal(got, fake_quantize(original, 2, 32, "rtn"))  # documented fallback: RTN
