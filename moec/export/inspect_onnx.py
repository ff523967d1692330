"""Read back what an exported ONNX file holds: the plan and config from its metadata, node annotations, sizes."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import GraphProto, TensorProto

from moec.core.errors import MoecError
from moec.core.config import MoEConfig
from moec.core.inventory import TENSOR_GROUPS, non_expert_weights
from moec.core.plan import BitPlan

_COLUMNS = 16  # experts per table row block, so 64-expert models stay readable


@dataclass
class OnnxInspection:
    """Plan, config and sizes recovered from one exported ``.onnx`` file alone."""

    path: Path
    graph: str
    plan: BitPlan
    cfg: MoEConfig
    annotated: dict[tuple[int, int], set[int]] = field(default_factory=dict)   # (layer, expert) -> bits on nodes
    expert_nodes: int = 0
    if_experts: int = 0
    weight_bytes: dict[str, int] = field(default_factory=dict)                  # experts / other / constants
    file_bytes: dict[str, int] = field(default_factory=dict)
    accuracy_level: int = 0                                                    # MatMulNBits attribute

    def mismatches(self) -> list[str]:
        """Experts whose node annotations disagree with (or are missing from) the plan."""
        out = []
        for layer, experts in sorted(self.plan.experts.items()):
            for e, bits in sorted(experts.items()):
                got = self.annotated.get((layer, e))
                if not self.plan.is_stored(layer, e):  # dropped or merged away: no nodes expected
                    if got:
                        out.append(f"layer {layer} expert {e}: not stored by the plan, nodes {sorted(got)}")
                elif got != {bits}:
                    out.append(f"layer {layer} expert {e}: plan {bits}, nodes {sorted(got) if got else 'none'}")
        return out

    def to_dict(self) -> dict:
        return {"file": str(self.path), "graph": self.graph, "accuracy_level": self.accuracy_level,
                "fingerprint": self.cfg.fingerprint(),
                "config": self.cfg.to_dict(), "plan": self.plan.to_json(),
                "average_expert_bits": self.plan.average_expert_bits(self.cfg),
                "non_expert_bits": non_expert_bits(self.plan, self.cfg), "expert_nodes": self.expert_nodes,
                "routed_if_nodes": self.if_experts, "annotation_mismatches": self.mismatches(),
                "weight_bytes": self.weight_bytes, "file_bytes": self.file_bytes}


def inspect_onnx(path: str | os.PathLike) -> OnnxInspection:
    """Recover the plan (``moec.plan``), config (``moec.config``) and annotations of ``path``."""
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"file '{p}' does not exist")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise MoecError(f"cannot read '{p}' as ONNX: {exc}") from None
    props = {e.key: e.value for e in model.metadata_props}
    if "moec.plan" not in props or "moec.config" not in props:
        raise MoecError(f"'{p}' has no moec plan metadata; was it written by 'moec export'?")
    try:
        cfg = MoEConfig(**json.loads(props["moec.config"]))
        plan = BitPlan.from_json(json.loads(props["moec.plan"]), source=f"plan in '{p.name}'")
    except (json.JSONDecodeError, TypeError) as exc:
        raise MoecError(f"'{p}' has unreadable moec metadata: {exc}") from None
    ins = OnnxInspection(p, props.get("moec.graph", "?"), plan, cfg,
                         accuracy_level=int(props.get("moec.accuracy_level", 0)))
    _walk(model.graph, ins)
    locations: set[str] = set()
    for t in model.graph.initializer:
        kind = "experts" if ".experts." in t.name else "constants" if t.name.startswith("const_") else "other weights"
        ins.weight_bytes[kind] = ins.weight_bytes.get(kind, 0) + _tensor_bytes(t, locations)
    ins.file_bytes[p.name] = p.stat().st_size
    for loc in sorted(locations):
        f = p.parent / loc
        ins.file_bytes[loc] = f.stat().st_size if f.is_file() else -1
    return ins


def _walk(graph: GraphProto, ins: OnnxInspection) -> None:
    for node in graph.node:
        meta = {e.key: e.value for e in node.metadata_props}
        if "expert" in meta:
            ins.expert_nodes += 1
            ins.annotated.setdefault((int(meta["layer"]), int(meta["expert"])), set()).add(int(meta["bits"]))
            if node.op_type == "If":
                ins.if_experts += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _walk(attr.g, ins)
            for g in attr.graphs:
                _walk(g, ins)


def _tensor_bytes(t: TensorProto, locations: set[str]) -> int:
    if t.data_location == TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in t.external_data}
        locations.add(ext.get("location", ""))
        return int(ext.get("length", 0))
    return len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes


def non_expert_bits(plan: BitPlan, cfg: MoEConfig) -> dict[str, list[int]]:
    """Bits used by each tensor group (attention, router, ...) of the non-expert weights."""
    out: dict[str, set[int]] = {}
    for name, _ in non_expert_weights(cfg):
        group = next((g for g, pat in TENSOR_GROUPS.items() if re.fullmatch(pat, name)), name)
        out.setdefault(group, set()).add(plan.tensor_bits(name))
    return {g: sorted(b) for g, b in out.items()}


def format_inspection(ins: OnnxInspection) -> str:
    """A readable multi-line summary: model, plan table (layer × expert bits), sizes, annotation check."""
    cfg, plan = ins.cfg, ins.plan
    lines = [f"{ins.path.name}: moec {ins.graph} graph (MatMulNBits accuracy_level {ins.accuracy_level})",
             f"model   {cfg.architecture}: {cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, "
             f"hidden {cfg.hidden_size}, expert width {cfg.expert_intermediate}, vocab {cfg.vocab_size} "
             f"(fingerprint {cfg.fingerprint()})",
             f"plan    group size {plan.group_size}, method {plan.method}, average expert bits "
             f"{plan.average_expert_bits(cfg):.3f}"
             + (f", provenance {json.dumps(plan.provenance)}" if plan.provenance else ""),
             "", "expert bits (layer x expert):"]
    for start in range(0, cfg.num_experts, _COLUMNS):
        cols = list(range(start, min(start + _COLUMNS, cfg.num_experts)))
        lines.append("layer  " + " ".join(f"{e:>3}" for e in cols))
        for layer in sorted(plan.experts):
            lines.append(f"{layer:>5}  " + " ".join(f"{plan.experts[layer].get(e, '-'):>3}" for e in cols))
    counts = Counter(b for layer in plan.experts.values() for b in layer.values())
    groups = non_expert_bits(plan, cfg)
    files = [f"{k} {v / 1e6:.3f} MB" if v >= 0 else f"{k} MISSING" for k, v in ins.file_bytes.items()]
    lines += ["", "experts per bit-width: " + ", ".join(f"{b}-bit {n}" for b, n in sorted(counts.items())),
              "other weights: " + ", ".join(f"{g} {'/'.join(map(str, b))}" for g, b in groups.items()),
              "weights: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in sorted(ins.weight_bytes.items())),
              "files:   " + ", ".join(files)]
    bad = ins.mismatches()
    lines.append(f"routing: {ins.if_experts} expert If nodes, {ins.expert_nodes} annotated expert nodes; "
                 + (f"{len(bad)} disagree with the plan, e.g. {bad[0]}" if bad else "annotations match the plan"))
    return "\n".join(lines)
