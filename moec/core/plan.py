"""BitPlan: the versioned JSON that gives every expert (and every other weight) its bit-width.

Format (version 1)::

    {"version": 1, "model_fingerprint": "…", "group_size": 64, "method": "mse",
     "experts": {"<layer>": {"<expert>": bits, …}, …},
     "tensors": {"<group, canonical name or re:pattern>": bits, …},
     "provenance": {…},
     "router_temperature": 1.2, "dropped_experts": {"<layer>": [expert, …]},   # optional knobs
     "merged_experts": {"<layer>": [[kept, absorbed, share], …]},
     "scales": "u8"}                                                            # optional scale format

``scales`` (``moec.core.formats.SCALE_FORMATS``, default ``fp16``) is how every quantized weight of the
plan stores its group scales: ``u8`` double-quantizes them (uint8 codes against a float16 super-scale
per 8 groups of a row); it is written only when it is not ``fp16``, so older plans read unchanged.

The two optional architecture knobs (``moec.models.knobs``): the router scores become those of
``logits / router_temperature``; dropped experts leave the router's choices and the stored bytes; a merged
pair ``[kept, absorbed, share]`` stores one expert, ``(1 − share) · kept + share · absorbed`` (weights
averaged), which the router reaches through either expert's choice (``moec.models.knobs``).

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
from moec.core.formats import ALL_BITS, DEFAULT_SCALES, get_scale_format
from moec.core.inventory import TENSOR_GROUPS, expert_shapes, non_expert_weights
from functools import lru_cache

from moec.core.io import atomic_write_json, read_json_strict

PLAN_VERSION = 1
#: The quantizer ``uniform:B`` means everywhere (compile, eval, export, search baselines).
UNIFORM_METHOD = "mse"
PLAN_METHODS = ("rtn", "mse", "hqq", "gptq")
MAX_GROUP = 1 << 16
MAX_PLAN_BYTES = 16 << 20
@dataclass
class BitPlan:
    experts: dict[int, dict[int, int]]
    tensors: dict[str, int] = field(default_factory=dict)
    group_size: int = 64
    method: str = "rtn"
    model_fingerprint: str = ""
    provenance: dict = field(default_factory=dict)
    #: Architecture knobs (co-design): softmax/sigmoid temperature of the router scores (1 = unchanged)
    #: and experts removed from the router's choices and from the stored weights, ``{layer: [expert]}``.
    router_temperature: float = 1.0
    dropped_experts: dict[int, list[int]] = field(default_factory=dict)
    #: Merged expert pairs ``{layer: [(kept, absorbed, share)]}``: ``kept`` stores the share-weighted
    #: average of both experts' weights, ``absorbed`` is not stored and routes to ``kept``.
    merged_experts: dict[int, list[tuple[int, int, float]]] = field(default_factory=dict)
    #: Scale format of every quantized weight (``moec.core.formats.SCALE_FORMATS``).
    scales: str = DEFAULT_SCALES

    @property
    def has_knobs(self) -> bool:
        """The plan changes the architecture (router temperature, dropped or merged experts)."""
        return self.router_temperature != 1.0 or any(self.dropped_experts.values()) or any(self.merged_experts.values())

    def is_dropped(self, layer: int, expert: int) -> bool:
        return expert in self.dropped_experts.get(layer, ())

    def merged_into(self, layer: int) -> dict[int, int]:
        """``{absorbed: kept}`` of ``layer``'s merged pairs."""
        return {b: a for a, b, _ in self.merged_experts.get(layer, ())}

    def is_stored(self, layer: int, expert: int) -> bool:
        """Whether the expert has weights of its own (neither dropped nor merged into another)."""
        return not self.is_dropped(layer, expert) and expert not in self.merged_into(layer)

    # -- lookups -------------------------------------------------------------------
    def tensor_bits(self, name: str) -> int:
        """Bits of a non-expert weight by the first matching key (float if none)."""
        for key, bits in self.tensors.items():
            pattern = TENSOR_GROUPS.get(key) or (key[3:] if key.startswith("re:") else re.escape(key))
            if _compile(pattern, "plan", key).fullmatch(name):
                return bits
        return 16

    def average_expert_bits(self, cfg: MoEConfig | None = None) -> float:
        vals = [b for layer in self.experts.values() for b in layer.values()]
        return sum(vals) / len(vals)

    # -- validation ----------------------------------------------------------------
    def validate(self, cfg: MoEConfig, allowed: tuple[int, ...] = ALL_BITS, pad_ok: bool = False) -> "BitPlan":
        """Check the plan fits ``cfg`` and ``allowed`` bits; raise MoecError naming the problem.

        ``pad_ok``: the caller pads MLP intermediate widths to whole groups
        (``moec.quant.padding``), so only hidden-dimension widths must be divisible.
        """
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
        self._validate_knobs(cfg, layers)
        missing = [(l, e) for l in sorted(layers) for e in range(cfg.num_experts) if e not in self.experts.get(l, {})]
        if missing:
            raise MoecError(f"plan gives no bits to {len(missing)} expert(s), e.g. layer {missing[0][0]} "
                            f"expert {missing[0][1]}")
        names = {n for n, _ in non_expert_weights(cfg)}
        for key, bits in self.tensors.items():
            _check_bits(bits, allowed, f"tensor key '{key}'")
            if key.startswith("re:"):
                _compile(key, "plan")
            if key in TENSOR_GROUPS or key.startswith("re:"):
                continue
            if key not in names:
                raise MoecError(f"plan names unknown tensor '{key}'; use a canonical weight name, a group "
                                f"({', '.join(TENSOR_GROUPS)}) or re:<pattern>")
        for name, k, bits in self._weights(cfg):
            if pad_ok and (name.endswith(".w2") or name.endswith("w2.weight")):
                continue  # the MLP intermediate width: padded to whole groups by the caller
            if bits != 16 and k % self.group_size:  # float weights have no groups
                divisors = [g for g in (128, 64, 32, 16, 8) if k % g == 0]
                hint = f" (e.g. --group-size {divisors[0]})" if divisors else ""
                raise MoecError(f"group size {self.group_size} does not divide the input width {k} of '{name}' "
                                f"({bits}-bit); pass --group-size with a divisor of {k}{hint}")
        return self

    def _validate_knobs(self, cfg: MoEConfig, layers: set[int]) -> None:
        t = self.router_temperature
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0.05 <= t <= 20.0):
            raise MoecError(f"plan: router_temperature must be a number in [0.05, 20], got {str(t)[:20]!r}")
        if t != 1.0 and cfg.router_logit_bias:
            raise MoecError("plan: router_temperature is implemented by scaling the router weight, which needs a "
                            "router without a logit bias (this model's router has one); remove that field")
        if any(self.merged_experts.values()):
            self._validate_merges(cfg, layers)
        if not any(self.dropped_experts.values()):
            return
        if cfg.router_bias or cfg.kept_groups < cfg.expert_groups:
            raise MoecError("plan drops experts, but dropping is implemented only for plain top-k routers "
                            "(no choice bias, no group-limited routing)")
        for layer, dropped in self.dropped_experts.items():
            if layer not in layers:
                raise MoecError(f"plan drops experts in layer {layer}, which is not a MoE layer")
            bad = [e for e in dropped if not 0 <= e < cfg.num_experts]
            if bad:
                raise MoecError(f"plan drops expert {bad[0]} in layer {layer}, but the model has "
                                f"{cfg.num_experts} experts")
            if cfg.num_experts - len(set(dropped)) < cfg.top_k:
                raise MoecError(f"plan drops {len(set(dropped))} of {cfg.num_experts} experts in layer {layer}; "
                                f"at least top-k = {cfg.top_k} must remain")

    def _validate_merges(self, cfg: MoEConfig, layers: set[int]) -> None:
        if cfg.router_bias or cfg.kept_groups < cfg.expert_groups or cfg.expert_bias:
            raise MoecError("plan merges experts, but merging is implemented only for plain top-k routers and "
                            "experts without biases")
        for layer, pairs in self.merged_experts.items():
            if layer not in layers:
                raise MoecError(f"plan merges experts in layer {layer}, which is not a MoE layer")
            seen: set[int] = set()
            for a, b, share in pairs:
                if not (0 <= a < cfg.num_experts and 0 <= b < cfg.num_experts) or a == b:
                    raise MoecError(f"plan merges experts {a} and {b} in layer {layer}: two different experts of "
                                    f"the {cfg.num_experts} are needed")
                if a in seen or b in seen:
                    raise MoecError(f"plan merges expert {a if a in seen else b} of layer {layer} twice; each "
                                    "expert may be in one merged pair")
                if self.is_dropped(layer, a) or self.is_dropped(layer, b):
                    raise MoecError(f"plan both drops and merges an expert of layer {layer}")
                if not 0.0 <= share <= 1.0:
                    raise MoecError(f"plan merges experts {a} and {b} of layer {layer} with share {share}; "
                                    "it must be in [0, 1]")
                seen |= {a, b}

    def _weights(self, cfg: MoEConfig) -> list[tuple[str, int, int]]:
        """(name, input width K, bits) of every 2-D weight; experts by their widest bits across the model."""
        out = []
        for layer, experts in sorted(self.experts.items()):
            for e, bits in sorted(experts.items()):
                for w, (_, k) in expert_shapes(cfg).items():
                    out.append((f"layers.{layer}.mlp.experts.{e}.{w}", k, bits))
        out += [(n, s[1], self.tensor_bits(n)) for n, s in non_expert_weights(cfg)]
        return out

    # -- JSON ----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "model_fingerprint": self.model_fingerprint,
                "group_size": self.group_size, "method": self.method,
                "experts": {str(l): {str(e): b for e, b in sorted(ex.items())} for l, ex in sorted(self.experts.items())},
                "tensors": dict(self.tensors), "provenance": self.provenance,
                **({"router_temperature": self.router_temperature} if self.router_temperature != 1.0 else {}),
                **({"dropped_experts": {str(l): sorted(ex) for l, ex in sorted(self.dropped_experts.items()) if ex}}
                   if any(self.dropped_experts.values()) else {}),
                **({"merged_experts": {str(l): [[a, b, s] for a, b, s in pairs]
                                       for l, pairs in sorted(self.merged_experts.items()) if pairs}}
                   if any(self.merged_experts.values()) else {}),
                **({"scales": self.scales} if self.scales != DEFAULT_SCALES else {})}

    @classmethod
    def from_json(cls, d: dict, source: str = "plan") -> "BitPlan":
        """A plan from its JSON form, strictly: exact types (no coercion), canonical ASCII layer/expert
        numbers, a model fingerprint, known method, regexes compiled now. Raises one-line MoecError."""
        if not isinstance(d, dict):
            raise MoecError(f"{source} is not a JSON object")
        version = d.get("version")
        if isinstance(version, bool) or version != PLAN_VERSION:
            raise MoecError(f"{source} has version {str(version)[:20]}; this moec reads version {PLAN_VERSION}")
        unknown = set(d) - {"version", "model_fingerprint", "group_size", "method", "experts", "tensors", "provenance",
                         "router_temperature", "dropped_experts", "merged_experts", "scales"}
        if unknown:
            raise MoecError(f"{source} has unknown field(s): {', '.join(sorted(str(u)[:40] for u in unknown))}")
        for key in ("experts", "model_fingerprint"):
            if key not in d:
                raise MoecError(f"{source} lacks field '{key}'")
        fp = d["model_fingerprint"]
        if not isinstance(fp, str) or not re.fullmatch(r"[0-9a-f]{16}", fp):
            raise MoecError(f"{source}: model_fingerprint must be the 16-hex-digit fingerprint of the model "
                            "it was made for")
        group = d.get("group_size", 64)
        if not _is_int(group) or not 1 <= group <= MAX_GROUP:
            raise MoecError(f"{source}: group_size must be an integer in [1, {MAX_GROUP}], got {str(group)[:20]!r}")
        method = d.get("method", "rtn")
        if method not in PLAN_METHODS:
            raise MoecError(f"{source}: unknown method {str(method)[:20]!r}; choices: {', '.join(PLAN_METHODS)}")
        provenance = d.get("provenance", {})
        if not isinstance(provenance, dict):
            raise MoecError(f"{source}: provenance must be a JSON object")
        experts_in = d["experts"]
        if not isinstance(experts_in, dict):
            raise MoecError(f"{source} is malformed: 'experts' must map layer -> expert -> bits")
        experts: dict[int, dict[int, int]] = {}
        for l, ex in experts_in.items():
            layer = _index(l, source, "layer")
            if not isinstance(ex, dict):
                raise MoecError(f"{source} is malformed: 'experts' must map layer -> expert -> bits")
            experts[layer] = {_index(e, source, f"expert in layer {layer}"): _bits(b, source, f"layer {layer} expert {e}")
                              for e, b in ex.items()}
        tensors_in = d.get("tensors", {})
        if not isinstance(tensors_in, dict):
            raise MoecError(f"{source}: 'tensors' must map a weight name, group or re:<regex> to bits")
        tensors = {}
        for k, v in tensors_in.items():
            if k.startswith("re:"):
                _compile(k, source)
            tensors[k] = _bits(v, source, f"tensor key '{k[:60]}'")
        temperature = d.get("router_temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise MoecError(f"{source}: router_temperature must be a number, got {str(temperature)[:20]!r}")
        dropped_in = d.get("dropped_experts", {})
        if not isinstance(dropped_in, dict) or not all(isinstance(v, list) for v in dropped_in.values()):
            raise MoecError(f"{source}: 'dropped_experts' must map layer -> list of experts")
        dropped = {}
        for l, ex in dropped_in.items():
            layer = _index(l, source, "dropped_experts layer")
            if not all(_is_int(e) for e in ex):
                raise MoecError(f"{source}: dropped_experts of layer {layer} must be integers")
            dropped[layer] = sorted(set(ex))
        scales = d.get("scales", DEFAULT_SCALES)
        try:
            get_scale_format(scales)
        except MoecError as exc:
            raise MoecError(f"{source}: {exc}") from None
        return cls(experts, tensors, group, method, fp, provenance, float(temperature), dropped,
                   _merged(d.get("merged_experts", {}), source), scales)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitPlan":
        return cls.from_json(read_json_strict(path, "plan", max_bytes=MAX_PLAN_BYTES), source=f"plan '{path}'")

    def copy(self) -> "BitPlan":
        return copy.deepcopy(self)


def uniform_plan(cfg: MoEConfig, bits: int, group_size: int = 64, method: str = "rtn",
                 router_bits: int = 16, scales: str = DEFAULT_SCALES) -> BitPlan:
    """Static baseline: every weight at ``bits`` (router float unless ``router_bits`` says otherwise)."""
    _check_bits(bits, ALL_BITS, "uniform plan")
    get_scale_format(scales)
    experts = {l: {e: bits for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    tensors = {"router": router_bits, "re:.*": bits}
    return BitPlan(experts, tensors, group_size, method, cfg.fingerprint(), {"policy": f"uniform-{bits}"},
                   scales=scales)


def resolve_plan(spec: str | os.PathLike, cfg: MoEConfig, group_size: int = 64,
                 method: str = UNIFORM_METHOD, pad_ok: bool = False, scales: str | None = None) -> BitPlan:
    """A plan file, or ``uniform:B`` (every weight at B bits with ``method``, default
    :data:`UNIFORM_METHOD` everywhere); validated against ``cfg``. ``scales`` (``--scales``) sets the
    scale format of ``uniform:B`` and overrides a plan file's (None: the file's, or ``fp16``)."""
    s = str(spec)
    if s.startswith("uniform:"):
        m = re.fullmatch(r"uniform:([0-9]{1,2})", s, re.ASCII)
        if not m:
            raise MoecError(f"bad plan spec '{s[:40]}'; expected uniform:<bits>")
        bits = int(m.group(1))
        return uniform_plan(cfg, bits, group_size, method, scales=scales or DEFAULT_SCALES).validate(cfg, pad_ok=pad_ok)
    plan = BitPlan.load(s)
    if scales is not None:
        get_scale_format(scales)
        plan.scales = scales
    return plan.validate(cfg, pad_ok=pad_ok)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _index(key, source: str, what: str) -> int:
    """A layer/expert key: canonical ASCII decimal ("1", not "01", " 1" or full-width digits)."""
    if not isinstance(key, str) or not re.fullmatch(r"0|[1-9][0-9]{0,6}", key, re.ASCII):
        raise MoecError(f"{source}: {what} key {str(key)[:20]!r} is not a plain decimal number")
    return int(key)


def _bits(b, source: str, where: str) -> int:
    if not _is_int(b):
        raise MoecError(f"{source}: {where}: bits must be an integer, got {str(b)[:20]!r}")
    return b


@lru_cache(maxsize=256)
def _compiled(pattern: str):
    return re.compile(pattern)


def _compile(key: str, source: str, shown: str | None = None):
    """The compiled regex of a tensor key (``re:<regex>`` or a group's pattern); bad ones fail here."""
    pattern = key[3:] if key.startswith("re:") else key
    if len(pattern) > 1000:
        raise MoecError(f"{source}: tensor key '{(shown or key)[:40]}…' is longer than 1000 characters")
    try:
        return _compiled(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise MoecError(f"{source}: tensor key '{(shown or key)[:60]}' is not a valid regex ({exc})") from None


def _check_bits(bits: int, allowed: tuple[int, ...], where: str) -> None:
    if bits not in allowed:
        raise MoecError(f"{where}: {bits} bits not allowed; allowed: {', '.join(map(str, allowed))}")


def _ranges(xs: list[int]) -> str:
    return f"{xs[0]}-{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))


def _merged(d, source: str) -> dict[int, list[tuple[int, int, float]]]:
    """``merged_experts`` from JSON: layer -> list of ``[kept, absorbed, share]``."""
    shape = f"{source}: 'merged_experts' must map layer -> list of [kept expert, absorbed expert, share]"
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise MoecError(shape)
    out = {}
    for l, pairs in d.items():
        layer = _index(l, source, "merged_experts layer")
        rows = []
        for p in pairs:
            if not (isinstance(p, list) and len(p) == 3 and _is_int(p[0]) and _is_int(p[1])
                    and isinstance(p[2], (int, float)) and not isinstance(p[2], bool)):
                raise MoecError(shape)
            rows.append((p[0], p[1], float(p[2])))
        out[layer] = rows
    return out
