"""MoEConfig: the family-independent description of a canonical MoE transformer."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from moec.core.errors import MoecError

QK_NORM_MODES = ("none", "full", "head")
ATTENTION_KINDS = ("gqa", "mla")
ROUTER_SCORINGS = ("softmax", "sigmoid", "sparsemixer", "topk_softmax")
NORM_KINDS = ("rms", "layer")
_MAX_DIM = 1 << 24


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class MoEConfig:
    """Shape and behaviour of a canonical MoE decoder.

    ``qk_norm`` is ``"none"``, ``"full"`` (RMSNorm over the whole q/k projection,
    OLMoE) or ``"head"`` (RMSNorm per head, Qwen3-MoE). ``dense_layers`` lists
    layers whose MLP is a plain SwiGLU instead of an MoE block.

    ``attention`` is ``"gqa"`` or ``"mla"`` (DeepSeek multi-head latent attention: ``q_lora_rank``
    (0: a plain q projection), ``kv_lora_rank``, ``qk_nope_dim``, ``qk_rope_dim``, ``v_head_dim``).
    The router scores with ``router_scoring`` (softmax or sigmoid), chooses experts on the scores
    plus a per-expert bias if ``router_bias`` (the gate weights stay the unbiased scores) and
    multiplies the gate weights by ``routed_scale``. With ``kept_groups < expert_groups`` the
    choice is group-limited: experts fall into ``expert_groups`` equal groups, each scored by the
    sum of its ``group_score_top`` best choice scores, and only the ``kept_groups`` best groups
    may be chosen. ``rope_factor`` > 1 selects YaRN RoPE
    (``rope_original_max``, ``rope_beta_fast``/``rope_beta_slow``, ``rope_truncate``: see
    :func:`rope_inv_freq`);
    ``attention_scale`` (0: ``1/sqrt(query head width)``) is the softmax scale. ``rotary_dim`` (0: the
    whole head) is how many leading dims of each GQA q/k head RoPE rotates (GLM-4.5's partial
    rotary). ``norm`` is ``"rms"`` or ``"layer"`` (LayerNorm with bias for the layer and final norms,
    Phi-MoE); ``attention_out_bias``/``lm_head_bias`` give ``o_proj``/``lm_head`` a bias. Granite's
    multipliers: the embeddings are scaled by ``embedding_scale``, each block's output by
    ``residual_scale`` before its residual add, the logits by ``logits_scale``. ``router_scoring``
    ``"sparsemixer"`` is Phi-MoE's top-2 at inference (:func:`moec.arch.blocks.sparsemixer`, with
    ``sparsemixer_eps``, the config's ``router_jitter_noise``). ``rope_ext_factors`` (empty: none)
    divide the plain RoPE inverse frequencies pair by pair (LongRoPE's short factors, Phi-3.5-MoE).

    gpt-oss: ``attention_out_bias``, ``attention_sinks`` (a learned
    per-head logit in every softmax denominator), ``sliding_window`` keys seen by the layers in
    ``sliding_layers`` (the query and the ``sliding_window - 1`` before it), ``router_scoring``
    ``"topk_softmax"`` (top-k of the router logits, softmax over those k), ``router_logit_bias``
    (the router linear has a bias), ``expert_bias`` (each routed expert's projections have biases)
    and ``swiglu_limit`` > 0: the clamped SwiGLU ``(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)``
    with ``g = min(gate, limit)`` and ``alpha = swiglu_alpha``. Fields added after v1 are left out of
    :meth:`to_dict` while at their defaults, so older fingerprints and plans stay valid.
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
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    router_scoring: str = "softmax"
    router_bias: bool = False
    routed_scale: float = 1.0
    expert_groups: int = 1
    kept_groups: int = 1
    group_score_top: int = 1
    rope_factor: float = 1.0
    rope_original_max: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    attention_scale: float = 0.0
    rotary_dim: int = 0
    norm: str = "rms"
    attention_out_bias: bool = False
    lm_head_bias: bool = False
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    logits_scale: float = 1.0
    sparsemixer_eps: float = 0.01
    rope_ext_factors: list[float] = field(default_factory=list)
    rope_truncate: bool = True
    attention_sinks: bool = False
    sliding_window: int = 0
    sliding_layers: list[int] = field(default_factory=list)
    router_logit_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.0

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
            (self.attention in ATTENTION_KINDS, f"attention must be one of {ATTENTION_KINDS}"),
            (self.router_scoring in ROUTER_SCORINGS, f"router_scoring must be one of {ROUTER_SCORINGS}"),
            (self.attention != "mla" or min(self.kv_lora_rank, self.qk_rope_dim, self.v_head_dim) > 0,
             "mla needs kv_lora_rank, qk_rope_dim and v_head_dim"),
            (self.qk_rope_dim % 2 == 0, "qk_rope_dim must be even"),
            (self.rotary_dim % 2 == 0 and self.rotary_dim <= self.head_dim, "rotary_dim must be even and <= head_dim"),
            (self.norm in NORM_KINDS, f"norm must be one of {NORM_KINDS}"),
            (not self.rope_ext_factors or len(self.rope_ext_factors) * 2 == self.rope_dim,
             "rope_ext_factors needs one factor per rotated pair"),
            (self.router_scoring != "sparsemixer" or self.top_k == 2, "sparsemixer routing chooses exactly 2 experts"),
            (self.num_experts % self.expert_groups == 0, "num_experts must be a multiple of expert_groups"),
            (self.kept_groups <= self.expert_groups, "kept_groups must be <= expert_groups"),
            (self.group_score_top <= self.num_experts // self.expert_groups, "group_score_top exceeds a group"),
            (self.kept_groups >= self.expert_groups or
             self.top_k <= self.kept_groups * (self.num_experts // self.expert_groups), "top_k exceeds the kept groups"),
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
        for name in ("shared_intermediate", "dense_intermediate", "q_lora_rank", "kv_lora_rank", "qk_nope_dim",
                     "qk_rope_dim", "v_head_dim", "rotary_dim"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= _MAX_DIM:
                bad(name, f"an integer in [0, {_MAX_DIM}]")
        if self.head_dim is not None and (not _is_int(self.head_dim) or not 1 <= self.head_dim <= _MAX_DIM):
            bad("head_dim", "a positive integer")
        for name in ("rms_eps", "rope_theta", "routed_scale", "rope_factor", "rope_beta_fast", "rope_beta_slow",
                     "embedding_scale", "residual_scale", "logits_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(name, "a positive finite number")
        for name in ("swiglu_limit", "sliding_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, "a finite number >= 0")
        if not _is_int(self.sliding_window):
            bad("sliding_window", "an integer >= 0")
        if isinstance(self.swiglu_alpha, bool) or not isinstance(self.swiglu_alpha, (int, float)) \
                or not math.isfinite(self.swiglu_alpha) or self.swiglu_alpha <= 0:
            bad("swiglu_alpha", "a positive finite number")
        for name in ("rope_original_max", "expert_groups", "kept_groups", "group_score_top"):
            v = getattr(self, name)
            if not _is_int(v) or not (name == "rope_original_max" or v >= 1) or not 0 <= v <= _MAX_DIM:
                bad(name, f"an integer in [{0 if name == 'rope_original_max' else 1}, {_MAX_DIM}]")
        for name in ("attention_scale", "sparsemixer_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, "a finite number >= 0")
        for name in ("norm_topk_prob", "shared_gate", "attention_bias", "tie_embeddings", "router_bias",
                     "attention_out_bias", "lm_head_bias", "rope_truncate", "attention_sinks",
                     "router_logit_bias", "expert_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        for name in ("qk_norm", "attention", "router_scoring", "norm"):
            if not isinstance(getattr(self, name), str):
                bad(name, "a string")
        if not isinstance(self.architecture, str):
            bad("architecture", "a string")
        f = self.rope_ext_factors
        if not isinstance(f, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                                              math.isfinite(v) and v > 0 for v in f):
            bad("rope_ext_factors", "a list of positive numbers")
        for name in ("dense_layers", "sliding_layers"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(_is_int(i) for i in v):
                bad(name, "a list of layer indices")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            bad("hidden_size", f"a multiple of num_heads ({self.num_heads})")

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.dense_layers]

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of each query/key head (all of it, except in MLA or with ``rotary_dim``)."""
        return self.qk_rope_dim if self.attention == "mla" else (self.rotary_dim or self.head_dim)

    def kv_cache_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, width) of one cached position's key and value, every layer alike.

        GQA caches ``num_kv_heads`` keys and values of ``head_dim``. MLA caches one "head": the
        key is the normalised compressed latent followed by the RoPE'd shared key part
        (``kv_lora_rank + qk_rope_dim``), the value is the latent alone (``kv_lora_rank``); the
        per-head up-projections are absorbed into the query and the output.
        """
        if self.attention == "mla":
            return (1, self.kv_lora_rank + self.qk_rope_dim), (1, self.kv_lora_rank)
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in fields(self):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if f.name in _LATER_FIELDS and d[f.name] == default:
                del d[f.name]
        return d

    def fingerprint(self) -> str:
        """Short hash of the architecture/shape: plans and profiles are tied to it."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_LATER_FIELDS = ("attention", "q_lora_rank", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim",
                 "router_scoring", "router_bias", "routed_scale", "expert_groups", "kept_groups", "group_score_top",
                 "rope_factor", "rope_original_max",
                 "rope_beta_fast", "rope_beta_slow", "attention_scale", "rotary_dim", "norm", "attention_out_bias",
                 "lm_head_bias", "embedding_scale", "residual_scale", "logits_scale", "sparsemixer_eps",
                 "rope_ext_factors", "rope_truncate", "attention_sinks", "sliding_window", "sliding_layers",
                 "router_logit_bias", "expert_bias", "swiglu_limit", "swiglu_alpha")


def rope_inv_freq(cfg: MoEConfig) -> list[float]:
    """Inverse frequencies of the ``rope_dim / 2`` rotation pairs (every backend builds its tables from these).

    Plain RoPE: ``theta ** (-2j / d)``, divided by ``rope_ext_factors[j]`` if given. YaRN
    (``rope_factor`` > 1): pairs rotating fewer than
    ``rope_beta_slow`` times over ``rope_original_max`` positions are interpolated (divided by
    the factor), those rotating more than ``rope_beta_fast`` times kept, with a linear ramp in
    between (bounds floored/ceiled to whole dimensions unless ``rope_truncate`` is false, as gpt-oss).
    """
    d, theta = cfg.rope_dim, cfg.rope_theta
    plain = [theta ** (-(2 * j) / d) for j in range(d // 2)]
    if cfg.rope_ext_factors:
        plain = [f / x for f, x in zip(plain, cfg.rope_ext_factors)]
    if cfg.rope_factor == 1.0:
        return plain

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original span
        return d * math.log(cfg.rope_original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if high == low else high
    out = []
    for j, f in enumerate(plain):
        keep = 1.0 - min(max((j - low) / (high - low), 0.0), 1.0)  # 1: extrapolate (keep), 0: interpolate
        out.append(f / cfg.rope_factor * (1.0 - keep) + f * keep)
    return out


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
