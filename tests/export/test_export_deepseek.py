"""DeepSeek-V2/V3, gpt-oss, GLM-4.5, Granite-MoE, Phi-MoE and ERNIE-4.5 checkpoints (tiny, built with
transformers) export to ONNX that matches torch fake-quant."""

from __future__ import annotations

import pytest
import torch
from export_fixtures import GROUP, mixed_plan
from test_export_numerics import _check_and_compare

from moec import api
from moec.core.plan import resolve_plan
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model

transformers = pytest.importorskip("transformers")
from tests.models.test_adapters import CASES, save_tiny_checkpoint  # noqa: E402

FAMILIES = ["deepseek_v2_lite", "deepseek_v3", "gpt_oss", "glm4_moe", "granite_moe_shared", "phimoe",
            "phimoe_longrope", "ernie45_moe"]


@pytest.mark.parametrize("spec", ["uniform:4", "mixed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_deepseek_export_matches_fake_quant(tmp_path, family, spec):
    save_tiny_checkpoint(tmp_path / "ckpt", family)
    model = load_checkpoint(tmp_path / "ckpt")
    plan = spec
    if spec == "mixed":
        plan = tmp_path / "plan.json"
        mixed_plan(model.cfg).save(plan)
    res = api.export_onnx(tmp_path / "ckpt", plan, tmp_path / "out", group_size=GROUP)
    fake_quantize_model(model, resolve_plan(plan, model.cfg, GROUP))
    _check_and_compare(res.out_dir, model, ids=[5, 17, 42, 9, 60, 7, 63, 2, 88, 31, 12, 50])
    # MLA's cache holds the latent (GQA, gpt-oss included, every position: sliding layers mask old keys): one "head" of kv_lora_rank + qk_rope_dim (key) and kv_lora_rank (value)
    summary = res.summary["graphs"]["decode"]["inputs"]
    key, value = ((1, 32 + 4), (1, 32)) if model.cfg.attention == "mla" else ((2, model.cfg.head_dim),) * 2
    assert summary["past.{i}.key"] == [1, key[0], "P", key[1]]
    assert summary["past.{i}.value"] == [1, value[0], "P", value[1]]


@pytest.mark.parametrize("family", ["deepseek_v2_lite", "gpt_oss"])
def test_deepseek_is_refused_layer_by_layer_not_misread(tmp_path, monkeypatch, family):
    """DeepSeek converts kv_b_proj (gpt-oss its experts) on load, which the lazy per-layer reader cannot
    do: over the memory budget the stage stops with one line instead of reading wrong weights."""
    import moec.models.memory_budget as budget
    from moec.core.errors import MoecError
    from moec.models.lazy import LazyCheckpoint

    make_cfg, cls = CASES[family]
    torch.manual_seed(0)
    cls(make_cfg()).save_pretrained(tmp_path / "ckpt")
    ckpt = LazyCheckpoint(tmp_path / "ckpt")  # headers (kv_b_proj, gpt-oss's fused experts included) check out
    assert not ckpt.reads_by_layer
    monkeypatch.setattr(budget, "WHOLE_MODEL_LIMIT", 0)
    with pytest.raises(MoecError, match="cannot be processed layer by layer") as ei:
        api.export_onnx(tmp_path / "ckpt", "uniform:4", tmp_path / "out", group_size=GROUP)
    assert "\n" not in str(ei.value) and not (tmp_path / "out").exists()
    with pytest.raises(MoecError, match="cannot be read layer by layer"):
        ckpt.layer(0)
