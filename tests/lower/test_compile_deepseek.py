"""DeepSeek-V2/V3 and gpt-oss checkpoints compile to host bundles whose greedy tokens equal torch fake-quant.

The bundle is compiled in memory and again from its ONNX export (``moec build``): same weights,
same tokens; prefill equals step-by-step decode (gpt-oss: a prompt longer than its sliding window).
The latent KV cache of MLA (one "head": latent + RoPE key part / latent) is checked too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from moec.cli.main import cli
from moec.artifact.weights_file import WeightsReader
from moec.core.plan import resolve_plan
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model
from tests.conftest import tiny_tokenizer
from tests.lower.plan_fixtures import mixed_plan

transformers = pytest.importorskip("transformers")
from tests.models.test_adapters import CASES, _randomise  # noqa: E402

pytestmark = pytest.mark.tvm
PROMPT = [5, 17, 42, 9, 60, 7, 63, 2]


@pytest.mark.parametrize("family", ["deepseek_v2_lite", "deepseek_v3", "gpt_oss"])
def test_deepseek_bundle_tokens_match_torch_fake_quant(tmp_path, family):
    from moec.runtime.session import BundleSession
    make_cfg, cls = CASES[family]
    torch.manual_seed(0)
    hf_cfg = make_cfg()
    hf_cfg.vocab_size = 300  # the test tokenizer's
    ref = cls(hf_cfg).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer(300).save(str(tmp_path / "ckpt" / "tokenizer.json"))
    model = load_checkpoint(tmp_path / "ckpt")
    plan_file = tmp_path / "plan.json"
    mixed_plan(model.cfg).save(plan_file)
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "ckpt"), "--plan", str(plan_file),
                                   "--out", str(tmp_path / "m"), "--onnx", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "onnx"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    mem, onnx = WeightsReader(tmp_path / "m"), WeightsReader(tmp_path / "b")
    assert sorted(mem.order) == sorted(onnx.order)
    for name in mem.order:
        np.testing.assert_array_equal(mem.array(name), onnx.array(name), err_msg=name)

    fake_quantize_model(model, resolve_plan(plan_file, model.cfg))
    want = model.generate_greedy(PROMPT, 16)
    for bundle in ("m", "b"):
        sess = BundleSession(tmp_path / bundle)
        got, _ = sess.generate(PROMPT, 16)
        assert got == want, bundle
    cfg = model.cfg
    sess.reset()
    prefilled = sess.prefill(PROMPT)
    sess.reset()
    for t in PROMPT:
        stepped = sess.step(t)
    np.testing.assert_allclose(prefilled, stepped, rtol=1e-4, atol=1e-4)
    if cfg.attention != "mla":
        assert len(PROMPT) > cfg.sliding_window and sess.past[0].shape == (cfg.num_kv_heads, len(PROMPT), cfg.head_dim)
        return
    sess.reset()
    sess.generate(PROMPT, 16)
    key, value = (t.numpy() for t in sess.past[:2])
    assert key.shape == (1, len(PROMPT) + 15, cfg.kv_lora_rank + cfg.qk_rope_dim)
    assert value.shape == (1, len(PROMPT) + 15, cfg.kv_lora_rank)
    np.testing.assert_array_equal(key[:, :, :cfg.kv_lora_rank], value)  # the latent, stored in both
