"""BitPlan: the versioned JSON that gives every expert (and every other weight) its bit-width.

Format (version 1)::

    {"version": 1, "model_fingerprint": "…", "group_size": 64, "method": "mse",
     "experts": {"<layer>": {"<expert>": bits, …}, …},
     "tensors": {"<group, canonical name or re:pattern>": bits, …},
     "provenance": {…}}

``experts`` must cover every MoE layer × expert. ``tensors`` covers all other 2-D weights;
keys are matched in order: a tensor group name (``attention``, ``shared_experts``,
``router``, ``embeddings``, ``lm_head``, ``dense_mlp``), an exact canonical tensor name,
or ``re:<regex>`` (full match). Unmatched tensors keep float (16). The router is float
unless a key names it. Bits are 2, 3, 4, 5, 6, 8 (quantized) or 16 (kept as float16).

Experts never activated in calibration: every plan must still give them bits (validation
refuses a plan that omits any expert), and they are quantized at those bits. Methods that
need calibration data (``gptq`` Hessians, activation-aware ``mse``/``hqq``) have none for
them and fall back to round-to-nearest; their sensitivity proxy is 0. They are never
silently left in float.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field

from moec.core.errors import MoecError
from moec.core.config import MoEConfig
from moec.core.formats import ALL_BITS
from moec.core.inventory import TENSOR_GROUPS, expert_shapes, non_expert_weights
from moec.core.io import atomic_write_json, read_json

PLAN_VERSION = 1
@dataclass
class BitPlan:
    experts: dict[int, dict[int, int]]
    tensors: dict[str, int] = field(default_factory=dict)
    group_size: int = 64
    method: str = "rtn"
    model_fingerprint: str = ""
    provenance: dict = field(default_factory=dict)

    # -- lookups -------------------------------------------------------------------
    def tensor_bits(self, name: str) -> int:
        """Bits of a non-expert weight by the first matching key (float if none)."""
        for key, bits in self.tensors.items():
            pattern = TENSOR_GROUPS.get(key) or (key[3:] if key.startswith("re:") else re.escape(key))
            if re.fullmatch(pattern, name):
                return bits
        return 16

    def average_expert_bits(self, cfg: MoEConfig | None = None) -> float:
        vals = [b for layer in self.experts.values() for b in layer.values()]
        return sum(vals) / len(vals)

    # -- validation ----------------------------------------------------------------
    def validate(self, cfg: MoEConfig, allowed: tuple[int, ...] = ALL_BITS) -> "BitPlan":
        """Check the plan fits ``cfg`` and ``allowed`` bits; raise MoecError naming the problem."""
        if self.model_fingerprint and self.model_fingerprint != cfg.fingerprint():
            raise MoecError(f"plan is for another model (fingerprint {self.model_fingerprint}, "
                            f"this model is {cfg.fingerprint()})")
        layers = set(cfg.moe_layers)
        for layer, experts in self.experts.items():
            if layer not in layers:
                raise MoecError(f"plan names MoE layer {layer}, but the model's MoE layers are "
                                f"{_ranges(sorted(layers))}")
            for e, bits in experts.items():
                if not 0 <= e < cfg.num_experts:
                    raise MoecError(f"plan names expert {e} in layer {layer}, but the model has "
                                    f"{cfg.num_experts} experts (0-{cfg.num_experts - 1})")
                _check_bits(bits, allowed, f"layer {layer} expert {e}")
        missing = [(l, e) for l in sorted(layers) for e in range(cfg.num_experts) if e not in self.experts.get(l, {})]
        if missing:
            raise MoecError(f"plan gives no bits to {len(missing)} expert(s), e.g. layer {missing[0][0]} "
                            f"expert {missing[0][1]}")
        names = {n for n, _ in non_expert_weights(cfg)}
        for key, bits in self.tensors.items():
            _check_bits(bits, allowed, f"tensor key '{key}'")
            if key in TENSOR_GROUPS or key.startswith("re:"):
                continue
            if key not in names:
                raise MoecError(f"plan names unknown tensor '{key}'; use a canonical weight name, a group "
                                f"({', '.join(TENSOR_GROUPS)}) or re:<pattern>")
        shapes = list(expert_shapes(cfg).values()) + [s for _, s in non_expert_weights(cfg)]
        for _, k in shapes:
            if k % self.group_size:
                raise MoecError(f"group size {self.group_size} does not divide a weight's input dim {k}")
        return self

    # -- JSON ----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "model_fingerprint": self.model_fingerprint,
                "group_size": self.group_size, "method": self.method,
                "experts": {str(l): {str(e): b for e, b in sorted(ex.items())} for l, ex in sorted(self.experts.items())},
                "tensors": dict(self.tensors), "provenance": self.provenance}

    @classmethod
    def from_json(cls, d: dict, source: str = "plan") -> "BitPlan":
        if not isinstance(d, dict):
            raise MoecError(f"{source} is not a JSON object")
        if d.get("version") != PLAN_VERSION:
            raise MoecError(f"{source} has version {d.get('version')!r}; this moec reads version {PLAN_VERSION}")
        unknown = set(d) - {"version", "model_fingerprint", "group_size", "method", "experts", "tensors", "provenance"}
        if unknown:
            raise MoecError(f"{source} has unknown field(s): {', '.join(sorted(unknown))}")
        try:
            experts = {int(l): {int(e): _as_bits(b) for e, b in ex.items()} for l, ex in d["experts"].items()}
            tensors = {str(k): _as_bits(v) for k, v in (d.get("tensors") or {}).items()}
            group = int(d.get("group_size", 64))
        except KeyError as exc:
            raise MoecError(f"{source} lacks field {exc}") from None
        except (TypeError, ValueError, AttributeError):
            raise MoecError(f"{source} is malformed: 'experts' must map layer -> expert -> bits") from None
        if group < 1:
            raise MoecError(f"{source}: group_size must be positive")
        return cls(experts, tensors, group, str(d.get("method", "rtn")), str(d.get("model_fingerprint", "")),
                   dict(d.get("provenance") or {}))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitPlan":
        return cls.from_json(read_json(path, "plan"), source=f"plan '{path}'")

    def copy(self) -> "BitPlan":
        return copy.deepcopy(self)


def uniform_plan(cfg: MoEConfig, bits: int, group_size: int = 64, method: str = "rtn",
                 router_bits: int = 16) -> BitPlan:
    """Static baseline: every weight at ``bits`` (router float unless ``router_bits`` says otherwise)."""
    _check_bits(bits, ALL_BITS, "uniform plan")
    experts = {l: {e: bits for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    tensors = {"router": router_bits, "re:.*": bits}
    return BitPlan(experts, tensors, group_size, method, cfg.fingerprint(), {"policy": f"uniform-{bits}"})


def resolve_plan(spec: str | os.PathLike, cfg: MoEConfig, group_size: int = 64, method: str = "rtn") -> BitPlan:
    """A plan file, or ``uniform:B`` for the static B-bit baseline; validated against ``cfg``."""
    s = str(spec)
    if s.startswith("uniform:"):
        try:
            bits = int(s.split(":", 1)[1])
        except ValueError:
            raise MoecError(f"bad plan spec '{s}'; expected uniform:<bits>") from None
        return uniform_plan(cfg, bits, group_size, method).validate(cfg)
    return BitPlan.load(s).validate(cfg)


def _as_bits(b) -> int:
    if isinstance(b, bool) or not isinstance(b, int):
        raise ValueError(b)
    return b


def _check_bits(bits: int, allowed: tuple[int, ...], where: str) -> None:
    if bits not in allowed:
        raise MoecError(f"{where}: {bits} bits not allowed; allowed: {', '.join(map(str, allowed))}")


def _ranges(xs: list[int]) -> str:
    return f"{xs[0]}-{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))
