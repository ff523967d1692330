"""Parameter set of a compiled model: packed weights in kernel form, experts stacked per bit class.

Experts of one MoE layer are grouped by bit-width: class ``c`` holds the experts with
``bits == c`` in one stacked tensor, and ``remap[l]`` ([E] int32) gives each expert's
index inside its class (``class_of[l]`` its class; a dropped expert has no stack: class 0, index
-1, and its router logit is masked to ``-inf``). A decode step therefore reads the
weights of its routed experts only: each class' kernel receives the routed ids remapped
into its stack, with -1 for routed experts that belong to another class.

A *nested* parameter set (:func:`build_nested_params`) instead stacks all ``E`` experts of a layer
once, in the nested storage of ``moec.quant.nested`` (entry ``layers.L.experts.nested.{w1,w3,w2}``,
arrays ``seg0``… , ``scale``, ``zero``), and gives the graph a run-time table
``layers.L.experts.prec`` (int32 ``[E]``, the width each expert is served at): a parameter like
the weights, so a runtime changes the plan by overwriting it, with no rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moec.core.config import MoEConfig
from moec.core.inventory import expert_key
from moec.core.formats import DEFAULT_SCALES, FLOAT_BITS, get_nested_format, get_scale_format
from moec.lower.kernels.cuda_layout import from_run_layout
from moec.quant.nested import NestedWeight, nest
from moec.quant.packed_model import PackedWeight
from moec.core.errors import MoecError
from moec.core.run_plan import plan_widths
from moec.core.plan import BitPlan


CUDA_RUNS = "cuda-runs"  # WeightEntry.layout of a nested stack laid out for the CUDA int8 GEMV


@dataclass
class WeightEntry:
    """One logical weight: its arrays (names → numpy) and how to read them."""

    bits: int
    shape: tuple[int, int]          # [N, K] of one matrix (per expert for stacks)
    arrays: dict[str, np.ndarray]   # "packed", "scale", "zero" (+ "super_scale") (quantized) or "weight" (float)
    stacked: int = 0                # number of experts stacked on axis 0 (0 = a plain weight)
    group_size: int = 0
    kernel: bool = False            # arrays are in the kernel layout ("kweight", "kscale", "kzero")
    nested: bool = False            # a nested stack: "seg0".., "scale", "zero" (moec.quant.nested)
    scales: str = DEFAULT_SCALES    # scale format (moec.core.formats.SCALE_FORMATS)
    layout: str = ""                # "cuda-runs": a nested stack's segments (a fixed one's 3-bit codes) in
    #                                 moec.lower.kernels.cuda_layout's layout

    @property
    def group(self) -> int:
        """The quantization group of a quantized weight: ``group_size``, else what its scales say (``K / groups``)."""
        return self.group_size or self.shape[1] // self.arrays["scale"].shape[-1]

    @property
    def super_groups(self) -> int:
        """Groups per super-scale of double-quantized scales (0: fp16 scales or a float weight)."""
        return get_scale_format(self.scales).super_groups if self.bits != FLOAT_BITS else 0

    def nested_weights(self) -> list[NestedWeight]:
        """The nested stack's experts as NestedWeights (moec's packed layout)."""
        segs = sorted((k for k in self.arrays if k.startswith("seg")), key=lambda k: int(k[3:]))
        stacks = [self.arrays[s] for s in segs]
        if self.layout == CUDA_RUNS:
            bits = get_nested_format(self.bits).segment_bits
            stacks = [from_run_layout(a, b, self.shape[1]) for a, b in zip(stacks, bits)]
        return [NestedWeight(self.shape, self.bits, self.group_size, [a[i] for a in stacks],
                             self.arrays["scale"][i], self.arrays["zero"][i]) for i in range(self.stacked)]

    def packed_weights(self) -> list[PackedWeight]:
        """The entry's weights as PackedWeights in moec's packed layout (one per stacked expert)."""
        if self.kernel:
            raise ValueError("entry is already in the kernel layout")
        count = self.stacked or 1
        arrays = self.arrays
        if self.layout == CUDA_RUNS:
            arrays = {**arrays, "packed": from_run_layout(arrays["packed"], self.bits, self.shape[1])}

        def part(key, i):
            a = arrays.get(key)
            return None if a is None else (a[i] if self.stacked else a)

        if "weight" in self.arrays:
            return [PackedWeight(self.shape, self.bits, self.group_size, part("weight", i)) for i in range(count)]
        return [PackedWeight(self.shape, self.bits, self.group_size, part("packed", i), part("scale", i),
                             part("zero", i), self.scales, part("super_scale", i)) for i in range(count)]


@dataclass
class ModelParams:
    """All tensors the compiled functions take, in a fixed order."""

    entries: dict[str, WeightEntry] = field(default_factory=dict)
    floats: dict[str, np.ndarray] = field(default_factory=dict)   # norms, biases (float32)
    class_of: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [E] bits (0: not stored)
    remap: dict[int, np.ndarray] = field(default_factory=dict)     # layer -> [E] index in class (-1: none)
    tables: dict[str, np.ndarray] = field(default_factory=dict)    # run-time int32 tables (nested widths)
    dropped: dict[int, list[int]] = field(default_factory=dict)    # layer -> experts the router never picks

    def expert_classes(self, layer: int) -> list[tuple[int, int]]:
        """(bits, experts stacked) of each expert stack of MoE layer ``layer``, narrowest first."""
        return [(c, self.entries[f"layers.{layer}.experts.b{c}.w1"].stacked)
                for c in sorted(set(self.class_of[layer].tolist()) - {0})]

    def flat(self) -> list[tuple[str, np.ndarray]]:
        """(name, array) in the order the compiled functions declare them."""
        out = []
        for name, entry in self.entries.items():
            out += [(f"{name}.{k}", v) for k, v in entry.arrays.items()]
        out += list(self.floats.items())
        out += list(self.tables.items())
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.flat())


def _arrays(pw: PackedWeight) -> dict[str, np.ndarray]:
    if pw.bits == FLOAT_BITS:
        return {"weight": pw.packed}
    if pw.super_scale is not None:
        return {"packed": pw.packed, "scale": pw.scale, "zero": pw.zero, "super_scale": pw.super_scale}
    return {"packed": pw.packed, "scale": pw.scale, "zero": pw.zero}


def _stack(pws: list[PackedWeight]) -> dict[str, np.ndarray]:
    per = [_arrays(p) for p in pws]
    return {k: np.stack([a[k] for a in per]) for k in per[0]}


def build_params(cfg: MoEConfig, plan: BitPlan, packed: dict[str, PackedWeight],
                 floats: dict[str, np.ndarray]) -> ModelParams:
    """Arrange already packed weights (e.g. read back from an exported ONNX file) for the graph."""
    params = ModelParams()
    for name, pw in packed.items():
        if ".experts." not in name:
            params.entries[name] = WeightEntry(pw.bits, pw.shape, _arrays(pw), group_size=pw.group_size,
                                               scales=pw.scales)
    for layer, experts in sorted(plan.experts.items()):
        # a dropped expert (masked out of the router's choices) has no stack: class 0, index -1
        # an expert merged into another has no stack either: it reads the kept expert's (below)
        bits = np.array([experts[e] if plan.is_stored(layer, e) else 0 for e in range(cfg.num_experts)],
                        dtype=np.int32)
        remap = np.full_like(bits, -1)
        for c in sorted(set(bits.tolist()) - {0}):
            members = np.flatnonzero(bits == c)
            remap[members] = np.arange(len(members))
            for proj in ("w1", "w3", "w2"):
                pws = [packed[expert_key(layer, int(e), proj)] for e in members]
                params.entries[f"layers.{layer}.experts.b{c}.{proj}"] = WeightEntry(
                    c, pws[0].shape, _stack(pws), stacked=len(members), group_size=pws[0].group_size,
                    scales=pws[0].scales)
        for absorbed, kept in plan.merged_into(layer).items():
            bits[absorbed], remap[absorbed] = bits[kept], remap[kept]
        params.class_of[layer], params.remap[layer] = bits, remap
    params.dropped = {l: sorted(ex) for l, ex in plan.dropped_experts.items() if ex}
    params.floats = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(floats.items())}
    return params


def nested_entry_name(layer: int, proj: str) -> str:
    """Entry of layer ``layer``'s nested stack of projection ``proj`` (``w1``, ``w3``, ``w2``)."""
    return f"layers.{layer}.experts.nested.{proj}"


def nested_entry(pws: list[PackedWeight], storage_bits: int) -> WeightEntry:
    """One nested stack (every expert of a layer, one projection) from the experts packed at ``storage_bits``."""
    if any(p.bits != storage_bits for p in pws):
        raise MoecError(f"nested storage needs every expert packed at {storage_bits} bits")
    nws = [nest(p) for p in pws]
    arrays = {f"seg{s}": np.stack([nw.segments[s] for nw in nws]) for s in range(len(nws[0].segments))}
    arrays["scale"] = np.stack([nw.scale for nw in nws])
    arrays["zero"] = np.stack([nw.zero for nw in nws])
    return WeightEntry(storage_bits, pws[0].shape, arrays, stacked=len(nws), group_size=pws[0].group_size, nested=True)


def build_nested_params(cfg: MoEConfig, plan: BitPlan, packed: dict[str, PackedWeight],
                        floats: dict[str, np.ndarray], storage_bits: int) -> ModelParams:
    """Parameters of a nested bundle: routed experts packed at ``storage_bits`` become one nested stack
    per layer and projection; ``plan``'s expert widths fill the run-time tables (the plan at load)."""
    if plan.scales != DEFAULT_SCALES:
        raise MoecError(f"nested expert storage takes fp16 scales, not '{plan.scales}' (plan scales)")
    params = ModelParams()
    for name, pw in packed.items():
        if ".experts." not in name:
            params.entries[name] = WeightEntry(pw.bits, pw.shape, _arrays(pw), group_size=pw.group_size)
    for layer in cfg.moe_layers:
        for proj in ("w1", "w3", "w2"):
            pws = [packed[expert_key(layer, e, proj)] for e in range(cfg.num_experts)]
            params.entries[nested_entry_name(layer, proj)] = nested_entry(pws, storage_bits)
    params.floats = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(floats.items())}
    params.tables = plan_widths(cfg, plan, storage_bits)
    return params
