"""Write a random OLMoE-1B-7B-shaped HF checkpoint (bf16, sharded safetensors, OlmoeForCausalLM names) streaming.

Tensors are written one at a time straight into the shards (header first, then data), so the
writer itself never holds more than one tensor; values are normal(0, std) bf16 slices of one
shared random pool at random offsets (fast: 13.8 GB in minutes on 2 cores), with unit norms.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
                   num_experts=64, num_experts_per_tok=8, vocab_size=50304, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position_embeddings=4096, norm_topk_prob=False, tie_word_embeddings=False)
SHARD_BYTES = 2 << 30


def hf_config(layers: int) -> dict:
    return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "num_hidden_layers": layers,
            "torch_dtype": "bfloat16", **OLMOE_1B_7B}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor, in file order."""
    h, i, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.self_attn.q_norm.weight", (h,)), (f"{p}.self_attn.k_norm.weight", (kv,)),
                (f"{p}.mlp.gate.weight", (e, h))]
        for x in range(e):
            out += [(f"{p}.mlp.experts.{x}.gate_proj.weight", (i, h)), (f"{p}.mlp.experts.{x}.up_proj.weight", (i, h)),
                    (f"{p}.mlp.experts.{x}.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (cfg["vocab_size"], h))]


def _bf16(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_checkpoint(root: Path, layers: int, seed: int = 0, text: str | None = None) -> Path:
    """Write config.json, model-0000k-of-000n.safetensors, the index and a small BPE tokenizer.json."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(layers)
    rng = np.random.default_rng(seed)
    largest = max(int(np.prod(s)) for _, s in tensor_shapes(cfg))
    pool = _bf16(rng.standard_normal(largest + (1 << 20), dtype=np.float32) * 0.02)
    ones = _bf16(np.ones(cfg["hidden_size"], np.float32))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(cfg):
        n = int(np.prod(shape)) * 2
        if size and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map = {}
    for k, items in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in items:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(root / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in items:
                count = int(np.prod(shape))
                if len(shape) == 1:
                    f.write(ones[:count].tobytes())
                else:
                    start = int(rng.integers(0, len(pool) - count))
                    f.write(pool[start:start + count].tobytes())
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text or "moec streams mixture of experts checkpoints layer by layer. " * 50], trainer)
    tok.save(str(root / "tokenizer.json"))
    return root
