"""Profiling records real routing statistics; evaluation matches a direct computation."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from moec.api import DataConfig, evaluate, profile
from moec.cli.main import cli
from moec.models.checkpoint import load_checkpoint
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import token_windows
from moec.profile.stats import ExpertStats


def test_profile_counts_match_router_topk(tiny_checkpoint, text_file):
    stats = profile(tiny_checkpoint, DataConfig(text_file, seq_len=32), progress=False)
    model = load_checkpoint(tiny_checkpoint)
    windows = token_windows(load_tokenizer(tiny_checkpoint), text_file.read_text(), 32)
    # recompute layer-0 routing by hand from the hidden states entering the first MoE block
    captured = []
    block = model.layers[0].mlp
    block.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(windows[:, :-1])
    _, idx, _ = block.route(captured[0])
    expected = np.bincount(idx.reshape(-1).numpy(), minlength=4)
    assert stats.tokens == windows[:, :-1].numel()
    np.testing.assert_array_equal(stats.layers[0].counts, expected)
    for layer in stats.layers:
        assert math.isclose(stats.frequency(layer).sum(), 2.0, rel_tol=1e-9)  # top-2
        assert (stats.contribution(layer) >= 0).all()


def test_never_activated_experts_are_kept_and_marked(text_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.conftest import make_tiny_checkpoint
    model_dir = tmp_path / "top1"
    make_tiny_checkpoint(model_dir, top_k=1)
    t = load_file(str(model_dir / "model.safetensors"))
    # top-1 routing with logits (b·x0, -b·x0, b·x0, 0): expert 3 can never win
    gate = torch.zeros_like(t["model.layers.1.block_sparse_moe.gate.weight"])
    gate[0, 0], gate[1, 0], gate[2, 0] = 50.0, -50.0, 50.0
    t["model.layers.1.block_sparse_moe.gate.weight"] = gate
    save_file(t, str(model_dir / "model.safetensors"))
    out = tmp_path / "stats.json"
    res = CliRunner().invoke(cli, ["profile", str(model_dir), "--data", str(text_file), "--seq-len", "32",
                                   "--out", str(out), "--plot", str(tmp_path / "heat.png")])
    assert res.exit_code == 0, res.output
    assert "never activated" in res.output
    stats = ExpertStats.load(out)
    assert (1, 3) in stats.never_activated()
    assert stats.contribution(1)[3] == 0.0
    assert (tmp_path / "heat.png").stat().st_size > 1000
    assert json.loads(out.read_text())["never_activated"]


def test_eval_matches_direct_cross_entropy(tiny_checkpoint, text_file):
    res = evaluate(tiny_checkpoint, DataConfig(text_file, seq_len=16), progress=False).result
    model = load_checkpoint(tiny_checkpoint)
    w = token_windows(load_tokenizer(tiny_checkpoint), text_file.read_text(), 16)
    with torch.no_grad():
        logits = model(w[:, :-1])
    nll = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten()).item()
    assert math.isclose(res.perplexity, math.exp(nll), rel_tol=1e-5)
    top1 = (logits.argmax(-1) == w[:, 1:]).float().mean().item()
    assert math.isclose(res.top1, top1, rel_tol=1e-6)


def test_eval_cli_json(tiny_checkpoint, text_file):
    res = CliRunner().invoke(cli, ["eval", str(tiny_checkpoint), "--data", str(text_file), "--json",
                                   "--seq-len", "16"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    direct = evaluate(tiny_checkpoint, DataConfig(text_file, seq_len=16), progress=False).result
    assert math.isclose(d["perplexity"], direct.perplexity, rel_tol=1e-6)
    assert math.isclose(d["top1"], direct.top1, rel_tol=1e-6)
