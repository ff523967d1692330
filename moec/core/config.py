"""MoEConfig: the family-independent description of a canonical MoE transformer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from moec.core.errors import MoecError

QK_NORM_MODES = ("none", "full", "head")


@dataclass
class MoEConfig:
    """Shape and behaviour of a canonical MoE decoder.

    ``qk_norm`` is ``"none"``, ``"full"`` (RMSNorm over the whole q/k projection,
    OLMoE) or ``"head"`` (RMSNorm per head, Qwen3-MoE). ``dense_layers`` lists
    layers whose MLP is a plain SwiGLU instead of an MoE block.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    top_k: int
    expert_intermediate: int
    head_dim: int | None = None
    norm_topk_prob: bool = True
    shared_intermediate: int = 0
    shared_gate: bool = False
    qk_norm: str = "none"
    attention_bias: bool = False
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    max_position: int = 4096
    dense_layers: list[int] = field(default_factory=list)
    dense_intermediate: int = 0
    architecture: str = "MixtralForCausalLM"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        checks = [
            (self.num_experts >= 1, "num_experts must be >= 1"),
            (1 <= self.top_k <= self.num_experts, "top_k must be in [1, num_experts]"),
            (self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"),
            (self.qk_norm in QK_NORM_MODES, f"qk_norm must be one of {QK_NORM_MODES}"),
            (all(0 <= i < self.num_layers for i in self.dense_layers), "dense_layers out of range"),
            (not self.dense_layers or self.dense_intermediate > 0, "dense layers need dense_intermediate"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MoecError(f"invalid MoE config: {msg}")

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.dense_layers]

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Short hash of the architecture/shape: plans and profiles are tied to it."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
