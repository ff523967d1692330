"""Shared builders for the export tests: tiny in-memory models with every MoEConfig feature, and plans."""

from __future__ import annotations

import numpy as np
import torch

from moec.core.config import MoEConfig
from moec.models.model import MoEModel
from moec.core.plan import BitPlan

#: Largest |logit difference| accepted between onnxruntime and the fake-quantized torch model.
#: Measured differences are ~1e-6 (float32 rounding of different summation orders).
LOGIT_TOL = 1e-3
GROUP = 16  # divides every K of the tiny models; MatMulNBits accepts it (power of two >= 16)
PROMPT = [5, 17, 42, 9, 100, 7, 63, 2, 88, 31, 12, 250]


def mixed_plan(cfg: MoEConfig, group_size: int = GROUP) -> BitPlan:
    """Experts cycle through 2/3/4/8/16/5/6 bits; non-expert tensors get mixed bits too."""
    cycle = [2, 3, 4, 8, 16, 5, 6]
    experts, n = {}, 0
    for layer in cfg.moe_layers:
        experts[layer] = {}
        for e in range(cfg.num_experts):
            experts[layer][e] = cycle[n % len(cycle)]
            n += 1
    tensors = {"embeddings": 3, "lm_head": 4, "router": 16, "re:layers\\.0\\.attn\\.[qk]_proj\\.weight": 2,
               "attention": 8, "shared_experts": 6, "shared_gate": 16, "dense_mlp": 5}
    return BitPlan(experts, tensors, group_size, "rtn", cfg.fingerprint(), {"policy": "test-mixed"})


FEATURE_CONFIGS = {
    # Qwen2-MoE-like: gated shared expert, q/k/v bias, un-normalised top-k, a dense first layer, full qk-norm
    "shared_gate_bias_dense_fullnorm": dict(
        shared_intermediate=32, shared_gate=True, attention_bias=True, norm_topk_prob=False,
        dense_layers=[0], dense_intermediate=48, qk_norm="full", num_layers=3),
    # Qwen3-MoE-like: per-head qk-norm, head_dim != hidden/heads, MQA, tied embeddings, ungated shared expert
    "headnorm_tied_mqa": dict(
        qk_norm="head", head_dim=32, num_kv_heads=1, tie_embeddings=True, shared_intermediate=16,
        top_k=3),
    # DeepSeek-V3-like: latent attention with q LoRA, sigmoid scores with a choice bias, renormalised
    # and scaled gates, a shared expert and a leading dense layer
    "mla_qlora_sigmoid_bias": dict(
        attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_dim=16, qk_rope_dim=8, v_head_dim=16,
        router_scoring="sigmoid", router_bias=True, routed_scale=2.5, shared_intermediate=32, num_experts=8,
        expert_groups=4, kept_groups=2, group_score_top=2,
        dense_layers=[0], dense_intermediate=48, num_layers=3, architecture="DeepseekV3ForCausalLM"),
    # DeepSeek-V2-Lite-like: latent attention without q LoRA, softmax scores scaled, not renormalised, YaRN
    "mla_softmax_scaled": dict(
        attention="mla", kv_lora_rank=16, qk_nope_dim=16, qk_rope_dim=16, v_head_dim=16, num_kv_heads=4,
        rope_factor=40.0, rope_original_max=64, attention_scale=0.3,
        routed_scale=1.5, norm_topk_prob=False, shared_intermediate=16, architecture="DeepseekV2ForCausalLM"),
}


def feature_model(name: str, seed: int = 0) -> MoEModel:
    """A random in-memory model (vocab 300, hidden 64, 4 experts) with the features of ``name``."""
    return random_model(seed, **FEATURE_CONFIGS[name])


def random_model(seed: int = 0, **overrides) -> MoEModel:
    """A random in-memory model (vocab 300, hidden 64, 4 experts, Qwen2-MoE unless ``overrides`` say)."""
    fields = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                  top_k=2, expert_intermediate=32, rms_eps=1e-5, architecture="Qwen2MoeForCausalLM")
    fields.update(overrides)
    torch.manual_seed(seed)
    model = MoEModel(MoEConfig(**fields)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif pname.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:  # biases
                p.normal_(0, 0.05)
    return model


def torch_logits(model: MoEModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).numpy()
