"""SearchProblem: the per-expert choices (bits, exact bytes, sensitivity, routing features) a policy searches over.

A plan assignment is an ``int`` array with one entry per routed expert: an index into
``problem.bits``. With the ``drop`` knob, ``bits[0]`` is :data:`~moec.core.formats.DROPPED_BITS` (0 bytes; the
expert goes into the plan's ``dropped_experts``, its loss the profile's width-0 sensitivity), and at most
``num_experts - top_k`` experts of a layer may take it. Non-expert weights keep the fixed bits of ``problem.tensors``; their bytes
(and the float norms) are ``fixed_bytes``, so ``fixed_bytes + Σ bytes[i, a_i]`` equals
:func:`moec.quant.accounting.plan_memory` of the plan exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.core.formats import DROPPED_BITS
from moec.core.inventory import expert_shapes, non_expert_weights
from moec.core.plan import BitPlan
from moec.profile.sensitivity import Sensitivity
from moec.quant.pack import packed_nbytes

log = logging.getLogger("moec")

#: Non-expert weights by default: router float, lm_head 8-bit, the rest (embeddings, attention, shared
#: experts) 4-bit: the best of the settings benchmarks/search_weighting.py compared on the reference model
#: at 50 % and 55 % of uniform INT8 MB (8-bit everywhere spends memory the experts use better).
DEFAULT_TENSORS = {"router": 16, "lm_head": 8, "re:.*": 4}
#: Architecture knobs the search can choose besides bit-widths (``moec search --knobs``).
SEARCH_KNOBS = ("drop",)


@dataclass
class SearchProblem:
    """Arrays over the ``n`` routed experts (rows) × ``m`` candidate bit-widths (columns)."""

    items: list[tuple[int, int]]          # (layer, expert) per row
    bits: tuple[int, ...]                 # candidate bit-widths, ascending
    nbytes: np.ndarray                    # int [n, m]: packed bytes of the expert (w1+w3+w2) at each bits
    loss: np.ndarray                      # float [n, m]: AccuracyLoss(e, b) (0 at 16 bits)
    frequency: np.ndarray                 # float [n]: fraction of tokens routed to the expert
    contribution: np.ndarray              # float [n]: mean ||g·E(x)|| / ||y|| over its routed tokens
    fixed_bytes: int                      # non-expert weights at their fixed bits + float norms
    budget_bytes: int                     # memory budget for all weights
    params_per_expert: int                # weight elements of one expert (for op counts)
    step_fixed_bytes: int                 # non-expert bytes read per decode step (embedding: one row)
    step_fixed_params: int                # non-expert weight elements used per decode step
    tensors: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TENSORS))
    group_size: int = 64
    method: str = "rtn"
    model_fingerprint: str = ""
    loss_source: str = "given"
    top_k: int = 1                        # experts per token: a layer keeps at least this many (drop knob)

    def __post_init__(self) -> None:
        n, m = len(self.items), len(self.bits)
        self.nbytes = np.asarray(self.nbytes, dtype=np.int64).reshape(n, m)
        self.loss = np.asarray(self.loss, dtype=float).reshape(n, m)
        self.frequency = np.asarray(self.frequency, dtype=float).reshape(n)
        self.contribution = np.asarray(self.contribution, dtype=float).reshape(n)
        self.layers = sorted({l for l, _ in self.items})
        self.layer_index = np.array([self.layers.index(l) for l, _ in self.items], dtype=np.int64)

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def m(self) -> int:
        return len(self.bits)

    @property
    def drops(self) -> bool:
        """Whether dropping an expert is a choice (column 0)."""
        return self.bits[0] == DROPPED_BITS

    @property
    def lowest(self) -> int:
        """Column of the lowest real bit-width (the all-lowest plan normalises the accuracy term)."""
        return 1 if self.drops else 0

    @property
    def read_bytes(self) -> np.ndarray:
        """Bytes a token routed to the expert reads, per choice. A dropped expert's tokens are served by
        another expert of its layer (top-k stays k): charged as one at the lowest real width."""
        if not self.drops:
            return self.nbytes
        out = self.nbytes.copy()
        out[:, 0] = self.nbytes[:, self.lowest]
        return out

    def max_drops(self, layer: int) -> int:
        """Experts of ``layer`` a plan may drop (top-k must remain)."""
        return int((self.layer_index == self.layers.index(layer)).sum()) - self.top_k

    # -- assignments ---------------------------------------------------------------
    def memory(self, assign: np.ndarray) -> int:
        return int(self.fixed_bytes + self.nbytes[np.arange(self.n), assign].sum())

    def feasible(self, assign: np.ndarray) -> bool:
        return self.memory(assign) <= self.budget_bytes

    def min_memory(self) -> int:
        kept = self.nbytes[:, self.lowest:].min(axis=1)
        if not self.drops:
            return int(self.fixed_bytes + kept.sum())
        total = self.fixed_bytes
        for k, layer in enumerate(self.layers):  # drop the largest of each layer, top-k kept
            rows = np.sort(kept[self.layer_index == k])
            total += int(rows[:self.top_k].sum())
        return int(total)

    def check_budget(self) -> None:
        if self.min_memory() > self.budget_bytes:
            low = f"{self.bits[self.lowest]} bits" + (f" (all but top-{self.top_k} per layer dropped)" if self.drops else "")
            raise MoecError(f"memory budget {self.budget_bytes / 1e6:.3f} MB is below the smallest plan "
                            f"({self.min_memory() / 1e6:.3f} MB with every expert at {low} and "
                            f"non-expert weights at {self.tensors})")

    def uniform(self, bits: int) -> np.ndarray:
        return np.full(self.n, self.bits.index(bits), dtype=np.int64)

    def bits_of(self, assign: np.ndarray) -> np.ndarray:
        return np.asarray(self.bits)[assign]

    def to_plan(self, assign: np.ndarray, provenance: dict | None = None) -> BitPlan:
        """The plan of ``assign``; a dropped expert is listed in ``dropped_experts`` (and keeps the lowest
        width in ``experts``, which nothing stores)."""
        experts: dict[int, dict[int, int]] = {}
        dropped: dict[int, list[int]] = {}
        for (layer, e), b in zip(self.items, self.bits_of(assign).tolist()):
            if b == DROPPED_BITS:
                dropped.setdefault(layer, []).append(e)
                b = self.bits[self.lowest]
            experts.setdefault(layer, {})[e] = int(b)
        return BitPlan(experts, dict(self.tensors), self.group_size, self.method, self.model_fingerprint,
                       dict(provenance or {}), dropped_experts=dropped)

    def from_plan(self, plan: BitPlan) -> np.ndarray:
        if any(plan.dropped_experts.values()) and not self.drops:
            raise MoecError("plan drops experts, but this search does not consider dropping (--knobs drop)")
        try:
            return np.array([0 if plan.is_dropped(l, e) else self.bits.index(plan.experts[l][e])
                             for l, e in self.items], dtype=np.int64)
        except (KeyError, ValueError):
            raise MoecError(f"plan uses bits outside the search's candidates {self.bits}") from None

    def fingerprint(self) -> str:
        """Hash of everything that defines the problem (a resumed search must match it)."""
        blob = json.dumps({"items": self.items, "bits": self.bits, "nbytes": self.nbytes.tolist(),
                           "loss": self.loss.round(12).tolist(), "freq": self.frequency.round(12).tolist(),
                           "contrib": self.contribution.round(12).tolist(), "fixed": self.fixed_bytes,
                           "budget": self.budget_bytes, "tensors": self.tensors, "group": self.group_size,
                           "method": self.method, **({"top_k": self.top_k} if self.drops else {})},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def expert_bytes(cfg: MoEConfig, bits: int, group_size: int) -> int:
    return sum(packed_nbytes(n, k, bits, group_size)["total"] for n, k in expert_shapes(cfg).values())


def build_problem(cfg: MoEConfig, stats, budget_mb: float, allowed_bits: list[int] | tuple[int, ...],
                  norm_bytes: int, tensors: dict[str, int] | None = None, group_size: int = 64,
                  method: str = "rtn", sensitivity: str = "auto", knobs: tuple[str, ...] = ()) -> SearchProblem:
    """The search problem of model ``cfg`` from a profile (``ExpertStats`` with sensitivity).

    ``sensitivity`` picks the AccuracyLoss source: ``exact`` (held-out NLL increase), ``proxy``
    (gate-weighted distortion) or ``auto`` (exact when the profile has it). Candidate bits are the
    target's allowed bits that the profile measured, plus 16 (loss 0). Negative measured losses
    (quantization noise that happened to help) are clipped to 0. ``knobs`` ``("drop",)`` adds the choice
    of dropping each expert (0 bytes, loss: the profile's width-0 column, see ``moec.profile.sensitivity``).
    """
    bad = sorted(set(knobs) - set(SEARCH_KNOBS))
    if bad:
        raise MoecError(f"unknown search knob '{bad[0]}'; choices: {', '.join(SEARCH_KNOBS)}")
    if stats.model_fingerprint != cfg.fingerprint():
        raise MoecError(f"profile is for another model (fingerprint {stats.model_fingerprint}, "
                        f"this model is {cfg.fingerprint()})")
    if not stats.sensitivity:
        raise MoecError("profile has no sensitivity; rerun `moec profile ... --sensitivity proxy` (or exact/both)")
    sens = Sensitivity.from_json(stats.sensitivity)
    if sensitivity not in ("auto", "exact", "proxy"):
        raise MoecError(f"unknown sensitivity source '{sensitivity}'; choices: auto, exact, proxy")
    kind = ("exact" if sens.exact else "proxy") if sensitivity == "auto" else sensitivity
    table = getattr(sens, kind)
    if not table:
        raise MoecError(f"profile has no {kind} sensitivity; rerun `moec profile ... --sensitivity {kind}`")
    if sens.group_size != group_size or sens.method != method:
        log.warning("sensitivity was measured with group %d/%s, the plan uses %d/%s", sens.group_size,
                    sens.method, group_size, method)
    candidates = sorted({b for b in allowed_bits if (b in sens.bits or b == 16) and b != DROPPED_BITS})
    skipped = sorted(set(allowed_bits) - set(candidates))
    if skipped:
        log.warning("bits %s allowed by the target but not measured in the profile: not searched", skipped)
    if not candidates:
        raise MoecError(f"no candidate bits: target allows {list(allowed_bits)}, profile measured {sens.bits}")
    if "drop" in knobs:
        if cfg.router_bias or cfg.kept_groups < cfg.expert_groups:
            raise MoecError("--knobs drop: dropping experts is implemented only for plain top-k routers (no choice "
                            "bias, no group-limited routing)")
        if DROPPED_BITS not in sens.bits:
            raise MoecError("--knobs drop needs the profile's sensitivity of dropping each expert; rerun `moec profile "
                            f"... --sensitivity {kind} --bits 0,{','.join(map(str, sens.bits))}`")
        candidates = [DROPPED_BITS] + candidates
    items = [(l, e) for l in cfg.moe_layers for e in range(cfg.num_experts)]
    loss = np.zeros((len(items), len(candidates)))
    for j, b in enumerate(candidates):
        if b == 16:
            continue
        col = sens.bits.index(b)
        for i, (l, e) in enumerate(items):
            if l not in table:
                raise MoecError(f"profile sensitivity lacks MoE layer {l}")
            loss[i, j] = max(float(table[l][e, col]), 0.0)
    per_bits = [0 if b == DROPPED_BITS else expert_bytes(cfg, b, group_size) for b in candidates]
    tensors = dict(tensors if tensors is not None else DEFAULT_TENSORS)
    probe = BitPlan({}, tensors, group_size)
    fixed = norm_bytes
    step_bytes = step_params = 0
    for name, (n, k) in non_expert_weights(cfg):
        b = probe.tensor_bits(name)
        if b not in allowed_bits:
            raise MoecError(f"non-expert weight '{name}' at {b} bits is not allowed on the target "
                            f"(allowed: {', '.join(map(str, allowed_bits))})")
        nb = packed_nbytes(n, k, b, group_size)["total"]
        fixed += nb
        rows = 1 if name == "embed.weight" else n  # the embedding is a gather: one row per token
        step_bytes += nb * rows // n
        step_params += rows * k
    freq = np.concatenate([stats.frequency(l) for l in cfg.moe_layers])
    contrib = np.concatenate([stats.contribution(l) for l in cfg.moe_layers])
    ppe = sum(n * k for n, k in expert_shapes(cfg).values())
    return SearchProblem(items, tuple(candidates), np.tile(per_bits, (len(items), 1)), loss, freq, contrib, fixed,
                         int(round(budget_mb * 1e6)), ppe, step_bytes, step_params, tensors, group_size, method,
                         cfg.fingerprint(), f"{kind} sensitivity", cfg.top_k)
