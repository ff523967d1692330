"""MoEConfig: the family-independent description of a canonical MoE transformer."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

from moec.core.errors import MoecError

QK_NORM_MODES = ("none", "full", "head")
_MAX_DIM = 1 << 24


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        self._check_types()
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

    def _check_types(self) -> None:
        """Exact types and sane ranges (config.json values are never coerced: 256.5 or "256" is refused)."""
        def bad(name: str, what: str):
            raise MoecError(f"invalid MoE config: {name} must be {what}, got {str(getattr(self, name))[:40]!r}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "num_experts",
                     "top_k", "expert_intermediate", "max_position"):
            v = getattr(self, name)
            if not _is_int(v) or not 1 <= v <= _MAX_DIM:
                bad(name, f"an integer in [1, {_MAX_DIM}]")
        for name in ("shared_intermediate", "dense_intermediate"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= _MAX_DIM:
                bad(name, f"an integer in [0, {_MAX_DIM}]")
        if self.head_dim is not None and (not _is_int(self.head_dim) or not 1 <= self.head_dim <= _MAX_DIM):
            bad("head_dim", "a positive integer")
        for name in ("rms_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(name, "a positive finite number")
        for name in ("norm_topk_prob", "shared_gate", "attention_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        if not isinstance(self.qk_norm, str):
            bad("qk_norm", "a string")
        if not isinstance(self.architecture, str):
            bad("architecture", "a string")
        if not isinstance(self.dense_layers, list) or not all(_is_int(i) for i in self.dense_layers):
            bad("dense_layers", "a list of layer indices")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            bad("hidden_size", f"a multiple of num_heads ({self.num_heads})")

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.dense_layers]

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Short hash of the architecture/shape: plans and profiles are tied to it."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def config_from_dict(d, where: str = "model config") -> "MoEConfig":
    """A MoEConfig from its ``to_dict`` form, refusing unknown or missing fields (one-line MoecError)."""
    if not isinstance(d, dict):
        raise MoecError(f"{where} is not a JSON object")
    names = {f.name for f in fields(MoEConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise MoecError(f"{where} has unknown field '{str(unknown[0])[:40]}'")
    try:
        return MoEConfig(**d)
    except TypeError as exc:
        raise MoecError(f"{where} is incomplete: {exc}") from None
