"""Exact memory accounting of a model under a BitPlan (bytes of packed weights, scales, zeros, floats)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moec.models.model import MoEModel
from moec.quant.pack import packed_nbytes
from moec.core.inventory import EXPERT_BIASES, expert_shapes, non_expert_weights
from moec.core.plan import BitPlan


@dataclass
class MemoryReport:
    """Bytes per part: ``rows`` maps a part name (``embed``, ``layer 0``, …) to bytes by kind."""

    rows: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, part: str, kind: str, nbytes: int) -> None:
        row = self.rows.setdefault(part, {})
        row[kind] = row.get(kind, 0) + nbytes

    @property
    def total(self) -> int:
        return sum(sum(r.values()) for r in self.rows.values())

    def kind_total(self, kind: str) -> int:
        return sum(r.get(kind, 0) for r in self.rows.values())

    @property
    def megabytes(self) -> float:
        return self.total / 1e6

    def table(self) -> tuple[list[str], list[list]]:
        kinds = sorted({k for r in self.rows.values() for k in r})
        rows = [[part] + [r.get(k, 0) / 1e6 for k in kinds] + [sum(r.values()) / 1e6] for part, r in self.rows.items()]
        rows.append(["total"] + [self.kind_total(k) / 1e6 for k in kinds] + [self.total / 1e6])
        return ["part"] + [f"{k} MB" for k in kinds] + ["total MB"], rows


def _part(name: str) -> str:
    return f"layer {name.split('.')[1]}" if name.startswith("layers.") else name.split(".")[0]


def _kind(name: str) -> str:
    if ".attn." in name:
        return "attention"
    if ".router." in name:
        return "router"
    if ".shared" in name:
        return "shared"
    if name.startswith("layers."):
        return "dense"
    return "embed/head"


def plan_memory(model: MoEModel, plan: BitPlan) -> MemoryReport:
    """Bytes the model occupies under ``plan``: equals the sum of :func:`pack_model` array sizes
    plus the float32 1-D tensors (norms, biases); experts the plan drops or merges away are not counted."""
    cfg = model.cfg
    rep = MemoryReport()
    for name, (n, k) in non_expert_weights(cfg):
        rep.add(_part(name), _kind(name), packed_nbytes(n, k, plan.tensor_bits(name), plan.group_size, plan.scales)["total"])
    shapes = expert_shapes(cfg)
    for layer, experts in plan.experts.items():
        for e, bits in experts.items():
            if not plan.is_stored(layer, e):
                continue  # a dropped or absorbed (merged) expert is not stored
            for n, k in shapes.values():
                rep.add(f"layer {layer}", "experts", packed_nbytes(n, k, bits, plan.group_size, plan.scales)["total"])
    for name, t in model.state_dict().items():
        if t.dim() == 1 or name.endswith(EXPERT_BIASES):  # gpt-oss's stacked expert biases stay float32 too
            rep.add(_part(name), "norms/bias", t.numel() * 4)
    return rep


def float32_memory(model: MoEModel) -> int:
    """Bytes of the unquantized model with every tensor in float32 (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * 4
    return total


def shape_model(cfg) -> MoEModel:
    """An :class:`MoEModel` of ``cfg`` on the meta device: shapes for accounting, no weight memory."""
    import torch

    with torch.device("meta"):
        return MoEModel(cfg)
