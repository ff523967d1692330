"""GPU linear emitter: each linear layer as one fused dequantize-GEMV PrimFunc for dlight's GPU rules.

The reference emitter dequantizes a whole weight into a float32 tensor and then multiplies: on a
GPU that writes and re-reads 4 bytes per weight every decode step (8x the traffic of a 4-bit
weight). Here dequantization is a block inside the GEMV's PrimFunc, reading the packed codes of
only the routed experts (``expert_ids`` indexes the stack directly, no gathered copy), so the
GPU schedule (dlight ``GEMV`` / ``Reduction``) inlines it and each weight byte is read once.
Embedding lookups stay with the reference emitter (one row per step).

Nested expert stacks (``moec compile --nested``) get the same fused form with the width read at run
time (:func:`expert_nested_gemv`): each bit-plane segment's load sits under its own
``prec[expert] >= width`` test, so a routed row reads only the planes its expert's width needs.

A prefill's routed stacks and dense projections are the grouped GEMM of ``schedules/cuda_gemm.py`` (rows sorted by
expert, each expert's weights read once per tile of its rows), its causal attention ``schedules/cuda_attention.py``.
It reads the CUDA run layout too; with int8 activations the rows of a weight whose decode GEMV took the int8 bodies
are first rounded per group exactly as that GEMV rounds them (``te_ops.int8_rows``), so the prefill's float sums
equal the decode steps' integer ones up to rounding. A stack the GEMM does not take (its shape, double-quantized
scales) leaves the bundle without a prefill function (decode steps).

Decode-step GEMVs whose shape the hand-written kernels take (``schedules/cuda_gemv.py``) use those
instead; with ``activations="int8"`` their int8 bodies (``schedules/cuda_gemv_int8.py``: ``dp4a`` over
activations quantized in the kernel), and the nested stacks (and fixed 3-bit ones) those bodies read in runs
of 32 are stored in ``kernels/cuda_layout.py``'s layout (:meth:`GpuLinearEmitter.relayout`). A shape the int8
bodies do not take keeps the float32 ones.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from moec.core.errors import MoecError
from moec.core.formats import get_nested_format
from moec.lower import te_ops
from moec.lower.kernels.activations import ACTIVATIONS
from moec.lower.kernels.cuda_layout import to_run_layout
from moec.lower.linear import LinearEmitter, clamped_ids, zero_other_rows
from moec.lower.params import CUDA_RUNS, WeightEntry
from moec.lower.schedules.cuda_attention import cuda_causal_attention
from moec.lower.schedules.cuda_gemm import cuda_grouped_gemm
from moec.lower.schedules.cuda_gemv import cuda_fixed_gemv, cuda_nested_gemv
from moec.lower.schedules.cuda_gemv_int8 import run_layout_fits
from moec.quant.nested import segment_positions


def _dequant(packed, scale, zero, lead, row, i, bits: int, group: int):
    """Weight ``[.., row, i]`` of an expert stack (``lead`` picks the expert) from packed codes."""
    g = tirx.floordiv(i, group)
    q = te_ops._code(packed, lead, row, i, bits, int(packed.shape[-1])).astype("float32")
    z = te_ops._code(zero, lead, row, g, bits, int(zero.shape[-1])).astype("float32")
    return (q - z) * scale[lead + (row, g)].astype("float32")


def dequant_gemv(x, packed, scale, zero, bits: int, n: int, k: int, group: int):
    """``y [R, N] = x [R, K] @ dequant(W).T`` with dequantization as a block of the same PrimFunc."""
    w = te.compute((n, k), lambda row, i: _dequant(packed, scale, zero, (), row, i, bits, group),
                   name="dequant")
    r = te.reduce_axis((0, k), name="k")
    return te.compute((x.shape[0], n), lambda j, row: te.sum(x[j, r] * w[row, r], axis=r), name="gemv")


def float_gemv(x, weight):
    """``y [R, N] = x [R, K] @ W.T`` for float16/float32 weights (converted in the loop)."""
    n, k = weight.shape
    r = te.reduce_axis((0, k), name="k")
    return te.compute((x.shape[0], n), lambda j, row: te.sum(
        x[j, r] * weight[row, r].astype("float32"), axis=r), name="gemv")


def expert_dequant_gemv(x, packed, scale, zero, ids, bits: int, n: int, k: int, group: int):
    """``y [top_k, N]``: row ``j`` = ``x[j or 0] @ dequant(W[ids[j]]).T`` (ids already clamped >= 0)."""
    top_k = ids.shape[0]
    per_expert = int(x.shape[0]) != 1
    w = te.compute((top_k, n, k), lambda j, row, i: _dequant(packed, scale, zero, (ids[j],), row, i, bits, group),
                   name="dequant")
    r = te.reduce_axis((0, k), name="k")
    return te.compute((top_k, n), lambda j, row: te.sum(
        x[j if per_expert else 0, r] * w[j, row, r], axis=r), name="gemv")


def expert_float_gemv(x, weight, ids):
    """Float16/float32 expert stack ``[E, N, K]``: ``y [top_k, N]`` as :func:`expert_dequant_gemv`."""
    top_k, (_, n, k) = ids.shape[0], weight.shape
    per_expert = int(x.shape[0]) != 1
    r = te.reduce_axis((0, k), name="k")
    return te.compute((top_k, n), lambda j, row: te.sum(
        x[j if per_expert else 0, r] * weight[ids[j], row, r].astype("float32"), axis=r), name="gemv")


def expert_nested_gemv(x, *args, storage_bits: int, n: int, k: int, group: int):
    """Nested stack: ``y [top_k, N]``, row ``j`` = ``x[j or 0] @ W_{prec[e]}[e].T``, ``e = ids[j]``.

    ``args``: one uint8 ``[E, N, bytes]`` LSB-first stream per segment (most significant first),
    ``scale`` float16 ``[E, N, G]``, ``zero`` uint8 ``[E, N, zero bytes]`` (storage-width codes),
    ``prec`` int32 ``[E]``, ``ids`` int32 ``[top_k]`` (all valid). Segment ``s`` is loaded only
    when ``prec[e]`` is at least the width it completes (``if_then_else``, a branch in the CUDA C:
    the skipped planes' bytes are never read), so the or of the loaded segments is the truncated
    code ``(q >> t) << t`` (``t = B − k``), dequantized at the centre of its bin as in
    ``moec.quant.nested``: ``scale · (q_t − zero + (2**t − 1) / 2)``.
    """
    fmt = get_nested_format(storage_bits)
    *segs, scale, zero, prec, ids = args
    top_k = ids.shape[0]
    per_expert = int(x.shape[0]) != 1
    positions = segment_positions(fmt)

    def weight(j, row, i):
        e = ids[j]
        width = prec[e]
        q = None
        for seg, bits, pos, need in zip(segs, fmt.segment_bits, positions, fmt.derived_bits):
            code = te_ops._code(seg, (e,), row, i, bits, int(seg.shape[-1])) << tirx.const(pos, "uint32")
            part = code if need == fmt.derived_bits[0] else tirx.if_then_else(
                width >= need, code, tirx.const(0, "uint32"))
            q = part if q is None else q | part
        g = tirx.floordiv(i, group)
        z = te_ops._code(zero, (e,), row, g, storage_bits, int(zero.shape[-1])).astype("float32")
        drop = (tirx.const(1, "int32") << (tirx.const(storage_bits, "int32") - width)).astype("float32")
        centre = (drop - tirx.const(1.0, "float32")) * tirx.const(0.5, "float32")
        return (q.astype("float32") - z + centre) * scale[e, row, g].astype("float32")

    w = te.compute((top_k, n, k), weight, name="dequant")
    r = te.reduce_axis((0, k), name="k")
    return te.compute((top_k, n), lambda j, row: te.sum(
        x[j if per_expert else 0, r] * w[j, row, r], axis=r), name="gemv")


#: How a routed expert stack's GEMV is made: ``bound`` the hand-written kernels (``schedules/cuda_gemv.py``,
#: threads bound: one body per run-time width for a nested stack, the same body for a fixed-width one),
#: ``serial`` the same bodies with serial loops (CPU tests), ``te`` the fused TE forms above scheduled by
#: ``FusedGemv`` (a nested stack's decodes every segment per weight; also the fallback for shapes the hand
#: kernels do not take).
EXPERT_KERNELS = ("bound", "serial", "te")


def _hand_kernel(make, kernel: str, *shape, swiglu: bool = False, activations: str = "float32",
                 run_layout: bool = False, seen: set | None = None):
    """The hand kernel ``make(*shape)`` with ``activations`` (int8 falling back to float32 for a shape its bodies
    do not take, except over the run layout, which only the int8 bodies read; ``seen`` collects the activations
    taken); None for ``te`` or a shape no body takes (k not a multiple of 256, groups not a multiple of 8)."""
    if kernel == "te":
        return None
    extra = {"run_layout": True} if run_layout else {}
    for acts in (activations,) if run_layout else dict.fromkeys((activations, "float32")):
        try:
            func = make(*shape, swiglu=swiglu, bind=kernel == "bound", activations=acts, **extra)
        except MoecError:
            continue
        if seen is not None:
            seen.add(acts)
        return func
    if run_layout:
        raise MoecError(f"the CUDA int8 GEMV does not take a run-layout stack of shape {shape}")
    return None


def _call(bb, func, args: list, name: str, top_k: int, n: int):
    gv = bb.add_func(func.without_attr("global_symbol"), name)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType((top_k, n), "float32")))


def _nested_arrays(entry: WeightEntry, vars_, name: str) -> list:
    """A nested stack's parameters in kernel order: ``seg0…``, ``scale``, ``zero``."""
    segs = sorted((a for a in entry.arrays if a.startswith("seg")), key=lambda a: int(a[3:]))
    return [vars_[f"{name}.{a}"] for a in (*segs, "scale", "zero")]


def emit_nested_gemv(bb, x, segs: list, scale, zero, prec, ids, storage_bits: int, n: int, k: int, group: int,
                     kernel: str = "bound", activations: str = "float32", run_layout: bool = False,
                     seen: set | None = None):
    """Emit the routed nested GEMV ``y [top_k, N]`` into ``bb`` (see :data:`EXPERT_KERNELS`; ``run_layout``:
    the segments are in ``kernels/cuda_layout.py``'s layout; ``seen``: as :func:`_hand_kernel`)."""
    top_k = int(ids.ty.shape[0])
    func = _hand_kernel(cuda_nested_gemv, kernel, storage_bits, n, k, int(scale.ty.shape[0]), top_k, group,
                        int(x.ty.shape[0]), activations=activations, run_layout=run_layout, seen=seen)
    if func is not None:
        return _call(bb, func, [x, *segs, scale, zero, prec, ids], "expert_nested_gemv", top_k, n)
    return bb.emit_te(
        expert_nested_gemv, x, *segs, scale, zero, prec, ids, storage_bits=storage_bits, n=n, k=k, group=group,
        primfunc_name_hint="expert_nested_gemv")


def emit_fixed_gemv(bb, x, packed, scale, zero, ids, bits: int, n: int, k: int, group: int, kernel: str = "bound",
                    activations: str = "float32", run_layout: bool = False, seen: set | None = None):
    """Emit the routed fixed-width GEMV ``y [top_k, N]`` (ids all valid) into ``bb`` (:data:`EXPERT_KERNELS`;
    ``run_layout``: 3-bit codes in ``kernels/cuda_layout.py``'s layout; ``seen``: as :func:`_hand_kernel`)."""
    top_k = int(ids.ty.shape[0])
    func = _hand_kernel(cuda_fixed_gemv, kernel, bits, n, k, int(scale.ty.shape[0]), top_k, group, int(x.ty.shape[0]),
                        activations=activations, run_layout=run_layout, seen=seen)
    if func is not None:
        return _call(bb, func, [x, packed, scale, zero, ids], "expert_dequant_gemv", top_k, n)
    return bb.emit_te(expert_dequant_gemv, x, packed, scale, zero, ids, bits, n, k, group,
                      primfunc_name_hint="expert_dequant_gemv")


class _Seen:
    """What :func:`_hand_kernel` reports (``add``) for one call: the activations its kernel took, recorded for the
    emitter and, int8, for the call's weights (their prefill GEMMs must then see the same rounded rows)."""

    def __init__(self, emitter: "GpuLinearEmitter", names: tuple[str, ...]) -> None:
        self.emitter, self.names = emitter, names

    def add(self, activations: str) -> None:
        self.emitter.seen.add(activations)
        if activations == "int8":
            self.emitter.int8_names.update(self.names)


class GpuLinearEmitter(LinearEmitter):
    """Fused dequantize-GEMV PrimFuncs (one per linear layer / routed expert call); ``expert_kernel`` picks
    the routed stacks' GEMV (:data:`EXPERT_KERNELS`), ``activations`` the hand kernels' bodies (float32, or
    int8 where they take the shape)."""

    def __init__(self, expert_kernel: str = "bound", activations: str = "float32") -> None:
        if expert_kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernel must be one of {EXPERT_KERNELS}, not {expert_kernel!r}")
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, not {activations!r}")
        self.expert_kernel, self.activations = expert_kernel, activations
        self.seen: set[str] = set()  # the activations of the hand kernels emitted so far
        self.int8_names: set[str] = set()  # the weights whose decode GEMVs took the int8 bodies
        self._rounded: dict[tuple, relax.Var] = {}  # (prefill input, group) -> its int8-rounded rows

    def _seen(self, *names: str) -> "_Seen":
        return _Seen(self, names)

    @property
    def resolved_activations(self) -> str:
        """What the bundle's hand kernels take: int8 if any GEMV took the int8 bodies, else float32."""
        return "int8" if "int8" in self.seen else "float32"

    def relayout(self, name: str, entry: WeightEntry) -> bool:
        """With int8 activations, a nested stack, or a routed stack of fixed 3-bit codes, that the int8 bodies read
        in runs of 32 gets its segments (codes) in ``kernels/cuda_layout.py``'s layout (``entry.layout`` =
        ``cuda-runs``); everything else keeps moec's."""
        n, k = entry.shape
        if (self.activations != "int8" or self.expert_kernel == "te" or entry.layout or entry.kernel
                or "weight" in entry.arrays or not entry.stacked or ".experts." not in name
                or not run_layout_fits(entry.bits, n, k, entry.group_size, nested=entry.nested)):
            return False
        if entry.nested:
            bits = get_nested_format(entry.bits).segment_bits
            entry.arrays = {a: to_run_layout(v, bits[int(a[3:])], k) if a.startswith("seg") else v
                            for a, v in entry.arrays.items()}
        else:
            entry.arrays = {**entry.arrays, "packed": to_run_layout(entry.arrays["packed"], entry.bits, k)}
        entry.layout = CUDA_RUNS
        return True

    def dense(self, bb, x, entry: WeightEntry, vars_, name):
        n, k = entry.shape
        if "weight" in entry.arrays:
            return bb.emit_te(float_gemv, x, vars_[f"{name}.weight"], primfunc_name_hint="gemv")
        packed, scale, zero = (vars_[f"{name}.{a}"] for a in ("packed", "scale", "zero"))
        group = entry.group
        rows = x.ty.shape[0]
        one_row = isinstance(rows, tirx.IntImm) and rows.value == 1
        func = _hand_kernel(cuda_fixed_gemv, self.expert_kernel, entry.bits, n, k, 1, 1, group, 1,
                            activations=self.activations, seen=self._seen(name)) if one_row else None
        if func is not None:
            # a decode step's one row: the hand-written kernel as a stack of one expert, routed to it (views)
            one = [bb.emit(relax.op.reshape(a, (1, *(int(d) for d in a.ty.shape)))) for a in (packed, scale, zero)]
            return _call(bb, func, [x, *one, relax.const(np.zeros(1, np.int32))], "dequant_gemv", 1, n)
        return bb.emit_te(dequant_gemv, x, packed, scale, zero, entry.bits, n, k, group,
                          primfunc_name_hint="dequant_gemv")

    def experts(self, bb, x, entry: WeightEntry, vars_, name, ids):
        n, k = entry.shape
        safe = clamped_ids(bb, ids)
        if "weight" in entry.arrays:
            y = bb.emit_te(expert_float_gemv, x, vars_[f"{name}.weight"], safe, primfunc_name_hint="expert_gemv")
        else:
            packed, scale, zero = (vars_[f"{name}.{a}"] for a in ("packed", "scale", "zero"))
            group = entry.group
            y = emit_fixed_gemv(bb, x, packed, scale, zero, safe, entry.bits, n, k, group, self.expert_kernel,
                                self.activations, entry.layout == CUDA_RUNS, self._seen(name))
        return zero_other_rows(bb, y, ids)

    def swiglu_experts(self, bb, x, gate: WeightEntry, up: WeightEntry, vars_, gate_name, up_name, ids):
        """``silu(gate x) · (up x)`` of the routed ``ids`` (-1: another bit class, row 0) in one hand-kernel call
        where both stacks are packed in one format and the kernel takes the shape; else None."""
        if self.expert_kernel == "te" or "weight" in gate.arrays or "weight" in up.arrays or (
                gate.bits, gate.shape, gate.arrays["scale"].shape, gate.layout) != (
                up.bits, up.shape, up.arrays["scale"].shape, up.layout):
            return None
        n, k = gate.shape
        top_k = int(ids.ty.shape[0])
        arrays = [vars_[f"{nm}.{a}"] for nm in (gate_name, up_name) for a in ("packed", "scale", "zero")]
        func = _hand_kernel(cuda_fixed_gemv, self.expert_kernel, gate.bits, n, k, int(arrays[1].ty.shape[0]), top_k,
                            gate.group, int(x.ty.shape[0]), swiglu=True,
                            activations=self.activations, run_layout=gate.layout == CUDA_RUNS,
                            seen=self._seen(gate_name, up_name))
        if func is None:
            return None
        y = _call(bb, func, [x, *arrays, clamped_ids(bb, ids)], "expert_dequant_swiglu", top_k, n)
        return zero_other_rows(bb, y, ids)

    def nested_swiglu_experts(self, bb, x, gate: WeightEntry, up: WeightEntry, vars_, gate_name, up_name, ids, prec):
        """``silu(gate x) · (up x)`` of two nested stacks' routed rows (all valid) at the widths of ``prec`` in one
        hand-kernel call; None where the stacks differ in format or the kernel does not take the shape."""
        if self.expert_kernel == "te" or (gate.bits, gate.shape, gate.group_size, gate.layout) != (
                up.bits, up.shape, up.group_size, up.layout):
            return None
        n, k = gate.shape
        top_k = int(ids.ty.shape[0])
        func = _hand_kernel(cuda_nested_gemv, self.expert_kernel, gate.bits, n, k,
                            int(vars_[f"{gate_name}.scale"].ty.shape[0]), top_k, gate.group_size, int(x.ty.shape[0]),
                            swiglu=True, activations=self.activations, run_layout=gate.layout == CUDA_RUNS,
                            seen=self._seen(gate_name, up_name))
        if func is None:
            return None
        args = [x, *_nested_arrays(gate, vars_, gate_name), *_nested_arrays(up, vars_, up_name), prec, ids]
        return _call(bb, func, args, "expert_nested_swiglu", top_k, n)

    def nested_experts(self, bb, x, entry: WeightEntry, vars_, name, ids, prec):
        """One fused nested dequantize-GEMV for the routed ``ids`` (all valid) at the widths in ``prec``."""
        n, k = entry.shape
        *segs, scale, zero = _nested_arrays(entry, vars_, name)
        return emit_nested_gemv(bb, x, segs, scale, zero, prec, ids, entry.bits, n, k, entry.group_size,
                                self.expert_kernel, self.activations, entry.layout == CUDA_RUNS, self._seen(name))

    # -- prefill: the grouped GEMM of schedules/cuda_gemm.py ---------------------------------------------------
    cpu_rows = False  # a prefill's norms and SiLU are the TE forms the GPU rules schedule; attention: below

    def _gemm(self, entry: WeightEntry, dense: bool = False):
        """The grouped GEMM over ``entry`` (``dense``: a plain weight, every row), or None where it does not take the
        stack (shape, scales)."""
        n, k = entry.shape
        if entry.super_groups or self.expert_kernel == "te":
            return None
        if "weight" in entry.arrays:
            kind, bits, group = "float", 16 if entry.arrays["weight"].dtype == np.float16 else 32, None
        else:
            kind, bits, group = "nested" if entry.nested else "fixed", entry.bits, entry.group
        try:
            return cuda_grouped_gemm(kind, bits, n, k, 1 if dense else entry.stacked, group, dense=dense,
                                     bind=self.expert_kernel == "bound", run_layout=entry.layout == CUDA_RUNS)
        except MoecError:
            return None

    def _rows_as_decoded(self, bb, x, entry: WeightEntry, name):
        """``x``'s rows as ``name``'s decode GEMV saw them: rounded to int8 per quantization group where it took the
        int8 bodies (so the prefill GEMM's float sums equal its int8 ones up to rounding), else ``x``. Rounded once
        per input and group: the projections that share an input (gate and up, q, k and v) share its rounding."""
        if name not in self.int8_names:
            return x
        key = (x, entry.group)
        if key not in self._rounded:
            self._rounded[key] = bb.emit_te(te_ops.int8_rows, x, entry.group, primfunc_name_hint="int8_rows")
        return self._rounded[key]

    def _stack_args(self, entry: WeightEntry, vars_, name) -> list:
        if "weight" in entry.arrays:
            return [vars_[f"{name}.weight"]]
        if entry.nested:
            return _nested_arrays(entry, vars_, name)
        return [vars_[f"{name}.{a}"] for a in ("packed", "scale", "zero")]

    def prefill_attention(self, bb, q, keys, values):
        rows, heads, hd = q.ty.shape
        kv_heads, vd = keys.ty.shape[0], values.ty.shape[2]
        if self.expert_kernel == "te":
            return None
        try:
            func = cuda_causal_attention(int(heads), int(kv_heads), int(hd), int(vd),
                                         bind=self.expert_kernel == "bound")
        except MoecError:
            return None
        gv = bb.add_func(func.without_attr("global_symbol"), "cuda_causal_attention")
        return bb.emit(relax.call_tir(gv, [q, keys, values], relax.TensorType((rows, heads, vd), "float32")))

    def has_grouped(self, entry: WeightEntry) -> bool:
        """Whether the grouped GEMM takes ``entry``. The prefill graph is built after the decode graph, whose GEMVs
        record the weights that took int8 bodies (:meth:`_rows_as_decoded`)."""
        return self._gemm(entry) is not None

    def grouped(self, bb, x, entry: WeightEntry, vars_, name, offsets, rows=None):
        func = self._gemm(entry)
        if func is None or entry.nested:
            return None
        return self._grouped_call(bb, func, x, self._stack_args(entry, vars_, name) + [offsets], entry, name, rows)

    def nested_grouped(self, bb, x, entry: WeightEntry, vars_, name, offsets, prec, rows=None):
        func = self._gemm(entry)
        if func is None:
            raise MoecError(f"internal: no CUDA grouped GEMM for the nested stack {name}")
        return self._grouped_call(bb, func, x, self._stack_args(entry, vars_, name) + [prec, offsets], entry, name,
                                  rows)

    def _grouped_call(self, bb, func, x, args: list, entry: WeightEntry, name, rows):
        if rows is not None:  # this emitter's kernels read sorted rows: gather them
            x = bb.emit(relax.op.take(x, rows, axis=0, mode="clip"))
        x = self._rows_as_decoded(bb, x, entry, name)
        gv = bb.add_func(func.without_attr("global_symbol"), str(func.attrs["global_symbol"]))
        return bb.emit(relax.call_tir(gv, [x, *args], relax.TensorType((x.ty.shape[0], entry.shape[0]), "float32")))

    def dense_rows(self, bb, x, entry: WeightEntry, vars_, name):
        func = None if "weight" in entry.arrays else self._gemm(entry, dense=True)
        if func is None:  # float weights (routers) and shapes the GEMM does not take: the TE form, GPU rules
            return self.dense(bb, self._rows_as_decoded(bb, x, entry, name), entry, vars_, name)
        one = [bb.emit(relax.op.reshape(a, (1, *(int(d) for d in a.ty.shape)))) for a in self._stack_args(
            entry, vars_, name)]  # a stack of one matrix (views)
        return self._grouped_call(bb, func, x, one, entry, name, None)
