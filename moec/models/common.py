"""Config fields shared by every supported HF family (attention shape, norms, RoPE)."""

from __future__ import annotations

from moec.core.errors import MoecError
from moec.models.adapter import require


def base_fields(hf: dict) -> dict:
    """Attention/embedding fields of a Llama-style HF config as MoEConfig keyword arguments."""
    require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise MoecError(f"RoPE scaling '{rope_type}' is not supported yet (only plain RoPE)")
    theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) else theta,
        tie_embeddings=hf.get("tie_word_embeddings", False),  # a bool, checked by MoEConfig (no coercion)
        max_position=hf.get("max_position_embeddings", 4096),
        architecture=hf["architectures"][0],
    )


def base_hf_config(cfg) -> dict:
    """Inverse of :func:`base_fields` (HF key names)."""
    return {
        "architectures": [cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
