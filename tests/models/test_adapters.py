"""Each family adapter's logits equal the transformers implementation on a tiny random config."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moec.models.checkpoint import load_checkpoint  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _mixtral():
    return transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                      num_experts_per_tok=2)


def _qwen2_moe():
    return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=24,
                                       shared_expert_intermediate_size=40, num_experts=6,
                                       num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1)


def _qwen2_moe_dense_layer():
    return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=24,
                                       shared_expert_intermediate_size=40, num_experts=6,
                                       num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0])


def _olmoe():
    return transformers.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=False)


def _qwen3_moe():
    return transformers.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=24,
                                       num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                                       decoder_sparse_step=1)


MLA = dict(kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
           intermediate_size=64)


def _deepseek_v2_lite():  # no q LoRA, softmax scores scaled, leading dense layer
    return transformers.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, **MLA, q_lora_rank=None,
                                         routed_scaling_factor=2.5, topk_method="greedy", norm_topk_prob=False)


def _deepseek_v2_grouped():  # q LoRA, group-limited routing: the best 1 of 2 groups (by its best expert)
    return transformers.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, **MLA, q_lora_rank=32,
                                         routed_scaling_factor=1.5, topk_method="group_limited_greedy",
                                         n_group=2, topk_group=1)


def _deepseek_v2_lite_yarn():  # the released V2-Lite's RoPE: YaRN, factor 40, mscale = mscale_all_dim
    return transformers.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, **MLA, q_lora_rank=None,
                                         routed_scaling_factor=1.0, topk_method="greedy", norm_topk_prob=False,
                                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                                          "original_max_position_embeddings": 4,
                                                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                          "mscale_all_dim": 0.707})


def _deepseek_v3():
    return transformers.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4, "num_hidden_layers": 3}, **MLA,
                                         q_lora_rank=32, routed_scaling_factor=2.5, n_group=4, topk_group=2,
                                         norm_topk_prob=True)  # the best 2 of 4 groups (by their top-2 sum)


def _glm4_moe():  # partial rotary, q/k/v bias, per-head q/k norm, V3 routing in 2 of 4 groups, dense layer 0
    return transformers.Glm4MoeConfig(**COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=32,
                                      n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
                                      topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                                      attention_bias=True, use_qk_norm=True, num_nextn_predict_layers=0)


GRANITE = dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=6.0,
               residual_multiplier=0.3, attention_multiplier=0.07, logits_scaling=4.0, attention_bias=True)


def _granite_moe():
    return transformers.GraniteMoeConfig(**COMMON, **GRANITE)


def _granite_moe_shared():
    return transformers.GraniteMoeSharedConfig(**COMMON, **GRANITE, shared_intermediate_size=16)


def _phimoe():  # sparsemixer, LayerNorm with bias, q/k/v/o and lm_head biases
    return transformers.PhimoeConfig(**COMMON, intermediate_size=32, num_local_experts=6, num_experts_per_tok=2,
                                     attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3)


def _phimoe_longrope():  # Phi-3.5-MoE's LongRoPE, short regime (the prompt is within original_max_position_embeddings)
    return transformers.PhimoeConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                     rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                      "short_factor": [1.0, 1.3, 2.0, 3.5], "long_factor": [2.0] * 4,
                                                      "short_mscale": 1.2, "long_mscale": 1.5,
                                                      "original_max_position_embeddings": 64})


def _ernie45_moe():  # interleaved RoPE, biased choice, shared expert, dense layer 0 (moe_layer_start_index)
    return transformers.Ernie4_5_MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=32, moe_num_experts=6,
                                           moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1)
def _gpt_oss():  # sliding (window 4) then full attention, sinks, biases, a clamp the activations reach
    return transformers.GptOssConfig(**COMMON, head_dim=8, intermediate_size=32, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=4, swiglu_limit=0.3,
                                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                      "original_max_position_embeddings": 4})


CASES = {
    "mixtral": (_mixtral, transformers.MixtralForCausalLM),
    "qwen2_moe": (_qwen2_moe, transformers.Qwen2MoeForCausalLM),
    "qwen2_moe_dense_layer": (_qwen2_moe_dense_layer, transformers.Qwen2MoeForCausalLM),
    "olmoe": (_olmoe, transformers.OlmoeForCausalLM),
    "qwen3_moe": (_qwen3_moe, transformers.Qwen3MoeForCausalLM),
    "deepseek_v2_lite": (_deepseek_v2_lite, transformers.DeepseekV2ForCausalLM),
    "deepseek_v2_grouped": (_deepseek_v2_grouped, transformers.DeepseekV2ForCausalLM),
    "deepseek_v2_lite_yarn": (_deepseek_v2_lite_yarn, transformers.DeepseekV2ForCausalLM),
    "deepseek_v3": (_deepseek_v3, transformers.DeepseekV3ForCausalLM),
    "glm4_moe": (_glm4_moe, transformers.Glm4MoeForCausalLM),
    "granite_moe": (_granite_moe, transformers.GraniteMoeForCausalLM),
    "granite_moe_shared": (_granite_moe_shared, transformers.GraniteMoeSharedForCausalLM),
    "phimoe": (_phimoe, transformers.PhimoeForCausalLM),
    "phimoe_longrope": (_phimoe_longrope, transformers.PhimoeForCausalLM),
    "ernie45_moe": (_ernie45_moe, transformers.Ernie4_5_MoeForCausalLM),
    "gpt_oss": (_gpt_oss, transformers.GptOssForCausalLM),
}


def _randomise(model: torch.nn.Module) -> None:
    # norms default to ones and biases to zeros: perturb everything so each tensor matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():  # DeepSeek-V3's choice bias: large enough to change the choice
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)
        for name, p in model.named_parameters():  # ERNIE keeps its choice bias as a parameter
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn_like(p) * 0.3)


def save_tiny_checkpoint(root, name: str, tokenizer_vocab: int | None = None, **overrides):
    """Save family ``name``'s tiny random transformers model (seed 0, perturbed) to ``root``; with
    ``tokenizer_vocab``, the vocabulary is the test tokenizer's, saved alongside. ``overrides`` set HF
    config fields the family has (others are ignored). Returns the transformers model."""
    from tests.conftest import tiny_tokenizer
    make_cfg, cls = CASES[name]
    torch.manual_seed(0)
    hf_cfg = make_cfg()
    if tokenizer_vocab:
        overrides["vocab_size"] = tokenizer_vocab
    for key, value in overrides.items():
        if hasattr(hf_cfg, key):
            setattr(hf_cfg, key, value)
    ref = cls(hf_cfg).eval()
    _randomise(ref)
    ref.save_pretrained(root)
    if tokenizer_vocab:
        tiny_tokenizer(tokenizer_vocab).save(str(root / "tokenizer.json"))
    return ref


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_matches_transformers(name, tmp_path):
    make_cfg, cls = CASES[name]
    torch.manual_seed(0)
    ref = cls(make_cfg()).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 12))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert (expected - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_kv_cache_decode_matches_full_forward(name, tmp_path):
    make_cfg, cls = CASES[name]
    torch.manual_seed(1)
    cls(make_cfg()).save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :4], cache)] + [model(ids[:, i:i + 1], cache) for i in range(4, 10)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("name, edit, field", [
    ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1875}},
     "partial_rotary_factor"),
    ("granite_moe", {"hidden_act": "gelu"}, "hidden_act"),
    ("phimoe", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ("phimoe", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 3,
                                    "short_mscale": 1.0, "original_max_position_embeddings": 64}},
     "rope_parameters.short_factor"),
    ("phimoe", {"sliding_window": 16}, "sliding_window"),
    ("phimoe", {"num_experts_per_tok": 3}, "num_experts_per_tok"),
    ("ernie45_moe", {"use_bias": True}, "use_bias"),
])
def test_unsupported_options_name_the_field(name, edit, field):
    from moec.core.errors import MoecError
    from moec.models.registry import get_adapter
    make_cfg, cls = CASES[name]
    hf = {**make_cfg().to_dict(), "architectures": [cls.__name__], **edit}
    with pytest.raises(MoecError, match=f"config field {field}=") as ei:
        get_adapter(hf["architectures"][0]).config(hf)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("name", ["glm4_moe", "granite_moe_shared", "phimoe", "ernie45_moe"])
def test_lazy_reader_checks_headers_and_reads_by_layer_only_when_exact(name, tmp_path):
    """Headers of every new family check out; only GLM (renamed tensors, plain embedding and head) is read
    layer by layer, and its layers equal the whole model's (its MTP layer ignored by both readers); the
    others are refused in one line."""
    from moec.core.errors import MoecError
    from moec.models.lazy import LazyCheckpoint
    save_tiny_checkpoint(tmp_path, name)
    if name == "glm4_moe":  # a multi-token-prediction layer after the last decoder layer: ignored
        from safetensors.torch import load_file, save_file
        tensors = load_file(tmp_path / "model.safetensors")
        tensors["model.layers.2.eh_proj.weight"] = torch.zeros(32, 64)
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    lazy = LazyCheckpoint(tmp_path)
    assert lazy.reads_by_layer == (name == "glm4_moe")
    if not lazy.reads_by_layer:
        with pytest.raises(MoecError, match="cannot be read layer by layer"):
            lazy.layer(1)
        return
    whole = load_checkpoint(tmp_path)
    for i in range(whole.cfg.num_layers):
        want = whole.layers[i].state_dict()
        got = lazy.layer(i).state_dict()
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
def _mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[.., N, K]`` -> MXFP4 blocks ``[.., N, K/32, 16]`` and E8M0 scales ``[.., N, K/32]`` (nearest E2M1)."""
    from moec.models.mxfp4 import FP4_VALUES
    g = w.double().reshape(*w.shape[:-1], -1, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    magnitude = torch.tensor(FP4_VALUES[:8], dtype=torch.float64)
    idx = ((g.abs() / 2.0 ** exp)[..., None] - magnitude).abs().argmin(-1)
    codes = idx | (g < 0).long() << 3
    blocks = codes[..., 0::2] | codes[..., 1::2] << 4
    return blocks.to(torch.uint8), (exp[..., 0] + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_experts_dequantize_like_transformers(tmp_path):
    """The released layout (``*_blocks``/``*_scales``, uint8) loads: moec's dequantization equals
    transformers' bit for bit, and the logits equal transformers' on the dequantized weights."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    make_cfg, cls = CASES["gpt_oss"]
    torch.manual_seed(0)
    ref = cls(make_cfg()).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for i, layer in enumerate(ref.model.layers):
        m = f"model.layers.{i}.mlp.experts"
        for proj in ("gate_up_proj", "down_proj"):
            blocks, scales = _mxfp4_encode(tensors.pop(f"{m}.{proj}").transpose(1, 2))  # [E, out, in]
            tensors[f"{m}.{proj}_blocks"], tensors[f"{m}.{proj}_scales"] = blocks, scales
            theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]: x @ W
            assert theirs.abs().max() > 0
            getattr(layer.mlp.experts, proj).data.copy_(theirs)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    from moec.models.lazy import LazyCheckpoint
    assert not LazyCheckpoint(tmp_path).reads_by_layer  # the pipeline's header check accepts the layout
    ours = load_checkpoint(tmp_path)
    torch.testing.assert_close(ours.layers[1].mlp.w2, ref.model.layers[1].mlp.experts.down_proj.transpose(1, 2),
                               rtol=0, atol=0)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 12))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("field, value", [("layer_types", ["sliding_attention", "chunked_attention"]),
                                          ("sliding_window", None), ("swiglu_limit", 0),
                                          ("rope_parameters", {"rope_type": "linear", "factor": 2.0})])
def test_gpt_oss_unsupported_option_is_one_line_naming_the_field(field, value):
    from moec.core.errors import MoecError
    from moec.models.registry import get_adapter
    hf = {**_gpt_oss().to_dict(), "architectures": ["GptOssForCausalLM"], field: value}
    with pytest.raises(MoecError) as ei:
        get_adapter("GptOssForCausalLM").config(hf)
    assert field in str(ei.value) and "\n" not in str(ei.value)
