"""DeepSeek-V3 (MLA) and gpt-oss aarch64 bundles on the emulated arm64 device through the tracker: host tokens
and logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moec.core.plan import BitPlan
from tests.hardware.emulated_fixtures import KEY
from tests.hardware.test_emulated_device import _trace

transformers = pytest.importorskip("transformers")
from tests.models.test_adapters import CASES, _randomise  # noqa: E402

# one xdist worker runs every test of the emulated device, so the session fixture boots it once
pytestmark = [pytest.mark.tvm, pytest.mark.farm, pytest.mark.xdist_group("arm64-emu")]
PROMPT = [5, 17, 42, 9, 60, 7, 63, 2]
NEW_TOKENS = 8


def _build(root, family: str) -> dict:
    from moec import api
    from moec.models.checkpoint import load_checkpoint
    from tests.conftest import tiny_tokenizer
    make_cfg, cls = CASES[family]
    torch.manual_seed(0)
    hf_cfg = make_cfg()
    hf_cfg.vocab_size = 300
    ref = cls(hf_cfg).eval()
    _randomise(ref)
    ref.save_pretrained(root / "ckpt")
    tiny_tokenizer(300).save(str(root / "ckpt" / "tokenizer.json"))
    cfg = load_checkpoint(root / "ckpt").cfg
    bits = [2, 3, 4, 8, 16]
    plan = BitPlan({l: {e: bits[(l + e) % 5] for e in range(cfg.num_experts)} for l in cfg.moe_layers},
                   {"attention": 8, "lm_head": 4, "embeddings": 8}, group_size=32, method="mse",
                   model_fingerprint=cfg.fingerprint())
    (root / "plan.json").write_text(json.dumps(plan.to_json()))
    return {t: api.compile_bundle(api.CompileConfig(root / "ckpt", root / t, t, root / "plan.json",
                                                    activations="float32"))
            for t in ("host", "aarch64-generic")}


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_bundle_on_emulated_device_matches_host(emulated_boot, tmp_path_factory, family):
    from moec.runtime.session import BundleSession, open_remote_bundle
    bundles = _build(tmp_path_factory.mktemp(f"emu-{family}"), family)
    run = emulated_boot.result()
    want_ids, want_logits = _trace(BundleSession(bundles["host"]), PROMPT, NEW_TOKENS)
    with open_remote_bundle(bundles["aarch64-generic"], str(run.tracker_address), KEY, timeout=60) as remote:
        got_ids, got_logits = _trace(remote, PROMPT, NEW_TOKENS)
        assert remote.generate(PROMPT, NEW_TOKENS)[0] == want_ids
        if family == "deepseek_v3":
            assert remote.cache[0].shape[0] == 1  # the latent cache: one "head"
    assert got_ids == want_ids
    for got, want in zip(got_logits, want_logits):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
