"""Kernel emitter: linear layers of the decode graph as scheduled fused dequantize-GEMV kernels.

Weights the kernels support (2/3/4/8-bit or float16, shapes accepted by
``check_kernel_shape``) are re-laid out once at build time by ``to_kernel_layout`` and
called through ``call_tir``; anything else (tiny routers, odd shapes, embedding
lookups) falls back to the reference emitter.

A routed-expert kernel has ``top_k`` rows; a row whose id is -1 (a routed expert of
another bit class) does no work when the kernel has a row guard
(:mod:`moec.lower.kernels.row_guard`), so a decode step reads only its routed experts and a bit
class with no routed expert costs one call's activation preparation; ``where`` zeroes those
rows, unless the kernel writes them 0 itself (``moec.row_zero``: the x86 int8 GEMVs, and the int8
SwiGLU GEMV that computes a class' gate and up projections in one call, ``swiglu_experts``). For a schedule without a guard such rows are pointed at the first routed member of the
class instead (re-reading weights the call reads anyway) and only a class with no routed
member reads one unrouted expert.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_SCALES, INT8_ACTIVATION_BITS
from moec.lower.kernels.activations import AUTO
from moec.lower.kernels.decode_attention import decode_attention
from moec.lower import te_ops
from moec.lower.kernels.factory import (add_kernel, make_gemv, make_grouped_gemm, make_nested_gemv,
                                       make_nested_grouped_gemm)
from moec.lower.kernels.row_guard import has_row_guard, zeroes_unrouted_rows
from moec.lower.kernels.row_topk import MAX_EXPERTS, row_topk_kernel
from moec.lower.kernels.rowwise import float_rows_kernel, silu_kernel
from moec.lower.kernels.layout import check_kernel_shape, nested_kernel_layout, stack_kernel_layouts, to_kernel_layout
from moec.lower.linear import LinearEmitter
from moec.lower.params import ModelParams, WeightEntry
from moec.lower.schedules import kernel_tile
from moec.quant.nested import NestedWeight
from moec.quant.packed_model import PackedWeight


#: Widest float weight (rows) the prefill's rows kernel takes (routers); wider ones keep the reference matmul.
ROWS_KERNEL_MAX_N = 256


class KernelEmitter(LinearEmitter):
    """Scheduled kernels for ``target`` where supported, reference emitter elsewhere.

    ``activations="int8"`` runs the decode GEMVs and prefill grouped GEMMs of quantized weights on
    int8-quantized activations (per group, like onnxruntime's accuracy_level 4; families with an
    int8 kernel), each token's row quantized as its decode step quantizes it; float weights keep
    float32 activations. Double-quantized (``u8``) scales are read by every kernel. ``auto``: int8
    when the family has an int8 GEMV for ``target``, float32 otherwise (``self.activations`` holds the
    resolved type).
    """

    def __init__(self, target: tvm.target.Target, activations: str = AUTO) -> None:
        self.target = target
        self._auto = activations == AUTO
        self._int8_ok: dict[tuple, bool] = {}  # (kernel builder, bits) -> has an int8 kernel on this target
        if self._auto:  # int8 where the target has an int8-activation GEMV, else the exact float32 kernels
            activations = "int8" if self._builds_int8(make_gemv, 4, 1) else "float32"
        elif activations != "float32":  # fail now, with the kernel builder's reason, not per layer
            make_gemv(4, 16, 64, 32, 1, 1, target, activations=activations)
        self.activations = activations
        self._supported: dict[tuple, bool] = {}
        self._kernels: dict[tuple, tvm.tirx.PrimFunc] = {}

    # -- build-time layout ---------------------------------------------------------
    def supports(self, pw: PackedWeight) -> bool:
        """Whether the family's kernels take this weight (asks the kernel builder itself)."""
        key = (pw.bits, pw.shape, pw.group_size, pw.scales)
        if key not in self._supported:
            try:
                check_kernel_shape(pw.bits, pw.shape[0], pw.shape[1], pw.group_size)
                make_gemv(pw.bits, pw.shape[0], pw.shape[1], pw.group_size, 1, 1, self.target, scales=pw.scales)
                self._supported[key] = True
            except MoecError:
                self._supported[key] = False
        return self._supported[key]

    def layout(self, pws: list[PackedWeight]) -> dict[str, np.ndarray] | None:
        """Kernel-layout arrays for one weight (or a stack), or None to keep moec's packed layout."""
        if not all(self.supports(p) for p in pws):
            return None
        layouts = [to_kernel_layout(p, kernel_tile(self.target, p.shape[0], p.bits, self._acts(p.bits)))
                   for p in pws]
        return {f"k{k}": v for k, v in stack_kernel_layouts(layouts).items()}

    def nested_layout(self, nws: list[NestedWeight]) -> dict[str, np.ndarray]:
        """Kernel-layout arrays of a nested stack (``kseg0``…, ``kscale``, ``kzero``)."""
        layouts = [nested_kernel_layout(nw, kernel_tile(self.target, nw.shape[0], None, self._nested_acts(nw.storage_bits)))
                   for nw in nws]
        return {f"k{k}": v for k, v in stack_kernel_layouts(layouts).items()}

    def relayout(self, name: str, entry: WeightEntry) -> bool:
        """Every nested stack and every weight the family's kernels take, in the kernel layout; the embedding
        stays in moec's packed layout (read by row lookups, not GEMVs)."""
        if name == "embed.weight" or entry.kernel:
            return False
        arrays = self.nested_layout(entry.nested_weights()) if entry.nested else self.layout(entry.packed_weights())
        if arrays is None:
            return False
        entry.arrays, entry.kernel = arrays, True
        return True

    # -- graph ---------------------------------------------------------------------
    def _int8(self, entry: WeightEntry) -> bool:
        """Whether this weight's kernels take int8 activations (quantized weights of an int8 width)."""
        return self._acts(entry.bits) == "int8"

    def _acts(self, bits: int) -> str:
        """The activations of the decode GEMV of a ``bits``-bit weight, which its layout tile is chosen for."""
        int8 = (self.activations == "int8" and bits in INT8_ACTIVATION_BITS
                and self._auto_has_int8(make_gemv, bits, 1))
        return "int8" if int8 else "float32"

    def _nested_acts(self, storage_bits: int) -> str:
        """The activations of the nested GEMV of a stack stored at ``storage_bits``."""
        int8 = self._acts(storage_bits) == "int8" and self._auto_has_int8(make_nested_gemv, storage_bits, 1)
        return "int8" if int8 else "float32"

    def _auto_has_int8(self, builder, bits: int, *args) -> bool:
        """Under ``auto``, whether ``builder`` has an int8-activation kernel of this width on the target (e.g. 3
        bits on x86 also needs AVX-512 VBMI; ARM has no int8 grouped GEMM, nor an int8 nested GEMV without
        dotprod): if not, that weight keeps float32 activations instead of failing the build. An explicit
        ``int8`` asks the builder and fails there."""
        return not self._auto or self._builds_int8(builder, bits, *args)

    def _builds_int8(self, builder, bits: int, *args) -> bool:
        """Whether ``builder`` makes an int8-activation kernel of this width for the target (cached)."""
        key = (builder.__name__, bits)
        if key not in self._int8_ok:
            try:
                builder(bits, 64, 128, 32, 1, *args, self.target, activations="int8")
                self._int8_ok[key] = True
            except MoecError:
                self._int8_ok[key] = False
        return self._int8_ok[key]

    def _kernel(self, entry: WeightEntry, top_k: int, per_expert: bool):
        n, k = entry.shape
        acts = self._acts(entry.bits)
        key = (entry.bits, n, k, entry.group_size, entry.stacked or 1, top_k, per_expert, acts, entry.scales)
        if key not in self._kernels:
            self._kernels[key] = make_gemv(*key[:6], self.target, x_per_expert=per_expert, activations=acts,
                                           scales=entry.scales)
        return self._kernels[key]

    def _call(self, bb, x, entry: WeightEntry, vars_, name, ids, top_k, per_expert):
        n = entry.shape[0]
        int8 = self._int8(entry)
        gv = add_kernel(bb, self._kernel(entry, top_k, per_expert),
                         _symbol("gemv", entry, f"t{top_k}", "xe" if per_expert else "", "i8" if int8 else ""))
        args = [x] + self._weight_args(entry, vars_, name) + [ids]
        return bb.emit(relax.call_tir(gv, args, relax.TensorType((top_k, n), "float32")))

    def _weight_args(self, entry: WeightEntry, vars_, name) -> list:
        args = [vars_[f"{name}.kweight"]]
        if entry.bits != 16:
            args += [vars_[f"{name}.kscale"]]
            if entry.super_groups:
                args += [vars_[f"{name}.ksuper_scale"]]
            args += [vars_[f"{name}.kzero"]]
        return args

    def nested_experts(self, bb, x, entry: WeightEntry, vars_, name, ids, prec):
        """One nested-GEMV call for the routed ``ids`` (all valid) at the widths in ``prec`` (int8 activations
        when the emitter's are: the stored widths, 4 and 8, are int8 widths)."""
        int8 = self._nested_acts(entry.bits) == "int8"
        return self._nested_call(bb, x, entry, None, vars_, name, None, ids, prec, "int8" if int8 else "float32")

    def nested_swiglu_experts(self, bb, x, gate: WeightEntry, up: WeightEntry, vars_, gate_name, up_name, ids, prec):
        """One int8 nested SwiGLU GEMV reading both stacks at the routed experts' widths (one table a layer), where
        the stacks take int8 activations and share one shape; else None."""
        same = (gate.bits, gate.shape, gate.group_size, gate.stacked) == (up.bits, up.shape, up.group_size, up.stacked)
        if not same or self._nested_acts(gate.bits) != "int8":
            return None
        return self._nested_call(bb, x, gate, up, vars_, gate_name, up_name, ids, prec, "int8")

    def _nested_call(self, bb, x, entry: WeightEntry, up: WeightEntry | None, vars_, name, up_name, ids, prec, acts):
        n, k = entry.shape
        top_k = int(ids.ty.shape[0])
        per_expert = int(x.ty.shape[0]) != 1
        swiglu = up is not None
        key = ("nested", entry.bits, n, k, entry.group_size, entry.stacked, top_k, per_expert, acts, swiglu)
        if key not in self._kernels:
            self._kernels[key] = make_nested_gemv(*key[1:7], self.target, x_per_expert=per_expert, activations=acts,
                                                  swiglu=swiglu)
        gv = add_kernel(bb, self._kernels[key], _symbol("nested_swiglu" if swiglu else "nested", entry, f"t{top_k}",
                                                        "xe" if per_expert else "", "i8" if acts == "int8" else ""))
        args = [x] + self._nested_args(entry, vars_, name) + (self._nested_args(up, vars_, up_name) if swiglu else [])
        return bb.emit(relax.call_tir(gv, args + [prec, ids], relax.TensorType((top_k, n), "float32")))

    def nested_grouped(self, bb, x, entry: WeightEntry, vars_, name, offsets, prec, rows=None):
        """One nested grouped-GEMM call on the pairs sorted by expert (``offsets``) at the widths in ``prec``, on
        the layout tile of the stack's nested GEMV: int8 activations where :meth:`gathers_rows` (``x``
        the rows ``rows`` gathers, every row quantized once; ``rows`` None: ``x`` is already sorted), else
        float32 on rows ``x`` sorted (gathered here when ``rows`` is given)."""
        n, k = entry.shape
        int8 = self._nested_grouped_int8(entry)
        x, rows = _grouped_rows(bb, x, rows, int8)
        key = ("nested-gemm", entry.bits, n, k, entry.group_size, entry.stacked, int8)
        if key not in self._kernels:
            self._kernels[key] = make_nested_grouped_gemm(*key[1:6], self.target,
                                                          layout_activations=self._nested_acts(entry.bits),
                                                          activations="int8" if int8 else "float32")
        gv = add_kernel(bb, self._kernels[key], _symbol("nested_gemm", entry, "i8" if int8 else ""))
        args = [x] + ([rows] if int8 else []) + self._nested_args(entry, vars_, name) + [prec, offsets]
        return bb.emit(relax.call_tir(gv, args, relax.TensorType(((rows if int8 else x).ty.shape[0], n), "float32")))

    def _nested_grouped_int8(self, entry: WeightEntry) -> bool:
        """Whether the nested stack's grouped GEMM takes int8 activations (and gathers its own rows): where its
        nested GEMV does and the family has an int8 nested grouped GEMM for the target (x86: AVX-512 VNNI or AVX2)."""
        return self._nested_acts(entry.bits) == "int8" and self._builds_int8(make_nested_grouped_gemm, entry.bits)

    @staticmethod
    def _nested_args(entry: WeightEntry, vars_, name) -> list:
        """A nested stack's parameters in kernel order: ``kseg0``…, ``kscale``, ``kzero``."""
        segs = sorted((a for a in entry.arrays if a.startswith("kseg")), key=lambda a: int(a[4:]))
        return [vars_[f"{name}.{a}"] for a in segs] + [vars_[f"{name}.kscale"], vars_[f"{name}.kzero"]]

    def _grouped_int8(self, entry: WeightEntry) -> bool:
        """Whether this weight's grouped GEMM takes int8 activations (and gathers its own rows): where its decode
        GEMV does and the family has an int8 grouped GEMM for the target (x86 VNNI; AVX2 at 2, 4, 8 bits), also
        under an explicit ``int8``, which is about the decode GEMVs (ARM dotprod prefill on float32 activations)."""
        return entry.kernel and self._int8(entry) and self._builds_int8(make_grouped_gemm, entry.bits)

    def has_grouped(self, entry: WeightEntry) -> bool:
        return entry.kernel  # every stack in the kernel layout has a grouped GEMM (fixed or nested)

    def gathers_rows(self, entry: WeightEntry) -> bool:
        return self._nested_grouped_int8(entry) if entry.nested else self._grouped_int8(entry)

    def grouped(self, bb, x, entry: WeightEntry, vars_, name, offsets, rows=None):
        if not entry.kernel:
            return None
        n, k = entry.shape
        int8 = self._grouped_int8(entry)
        x, rows = _grouped_rows(bb, x, rows, int8)
        key = ("gemm", entry.bits, n, k, entry.group_size, entry.stacked or 1, "int8" if int8 else "float32",
               entry.scales, self._acts(entry.bits))
        if key not in self._kernels:  # on the layout tile of the weight's decode GEMV (its activations: key[8])
            self._kernels[key] = make_grouped_gemm(*key[1:6], self.target, activations=key[6], scales=entry.scales,
                                                   layout_activations=key[8])
        gv = add_kernel(bb, self._kernels[key], _symbol("gemm", entry, "i8" if int8 else ""))
        args = [x] + ([rows] if int8 else []) + self._weight_args(entry, vars_, name) + [offsets]
        return bb.emit(relax.call_tir(gv, args, relax.TensorType(((rows if int8 else x).ty.shape[0], n), "float32")))

    def dense_rows(self, bb, x, entry: WeightEntry, vars_, name):
        n = entry.shape[0]
        if not entry.kernel and "weight" in entry.arrays and n <= ROWS_KERNEL_MAX_N:
            # a small float weight (a router): its transpose as float32 (a few µs per call), then a vectorised
            # kernel over blocks of rows instead of the legalized matmul
            wt = bb.emit(relax.op.astype(relax.op.permute_dims(vars_[f"{name}.weight"]), "float32"))
            block = max(1, min(8, 128 // n))
            gv = add_kernel(bb, float_rows_kernel(n, block), f"float_rows_n{n}_b{block}")
            return bb.emit(relax.call_tir(gv, [x, wt], relax.TensorType((x.ty.shape[0], n), "float32")))
        if not entry.kernel:
            return super().dense_rows(bb, x, entry, vars_, name)
        # one "expert" holding every row: offsets [0, T]
        offsets = bb.emit_te(lambda t: te.compute(
            (2,), lambda i: tirx.if_then_else(i == 0, 0, t.shape[0]).astype("int32"), name="offsets"), x)
        return self.grouped(bb, x, entry, vars_, name, offsets)

    def decode_attention(self, bb, q, k, v, cache_k, cache_v, pos, scale: float):
        heads, kv_heads = int(q.ty.shape[0]), int(k.ty.shape[0])
        head_dim, value_dim = int(q.ty.shape[1]), int(v.ty.shape[2])
        key = ("attention", heads, kv_heads, head_dim, value_dim, float(scale))
        if key not in self._kernels:
            self._kernels[key] = decode_attention(heads, kv_heads, head_dim, value_dim, scale)
        # one softmax scale per model: a second one would be a different kernel, refused by add_kernel
        gv = add_kernel(bb, self._kernels[key], f"decode_attention_h{heads}_kv{kv_heads}_d{head_dim}_v{value_dim}")
        # outputs: the attention (new), the two caches (written in place: arguments 3 and 4)
        outs = bb.emit(relax.call_tir_inplace(gv, [q, k, v, cache_k, cache_v, relax.prim_value(pos)], [-1, 3, 4], [
            relax.TensorType((heads, value_dim), "float32"), cache_k.ty, cache_v.ty]))
        return tuple(bb.emit(relax.TupleGetItem(outs, i)) for i in range(3))

    def row_topk(self, bb, x, k: int):
        n = x.ty.shape[-1]
        if x.ty.ndim != 2 or not isinstance(n, tirx.IntImm) or int(n) > MAX_EXPERTS:
            return None
        gv = add_kernel(bb, row_topk_kernel(int(n), k), f"row_topk_n{int(n)}_k{k}")
        rows = x.ty.shape[0]
        out = bb.emit(relax.call_tir(gv, [x], [relax.TensorType((rows, k), "float32"),
                                              relax.TensorType((rows, k), "int32")]))
        return bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))

    def row_silu(self, bb, x):
        width = x.ty.shape[-1]
        if x.ty.ndim != 2 or not isinstance(width, tirx.IntImm):
            return None
        gv = add_kernel(bb, silu_kernel(int(width)), f"row_silu_{int(width)}")
        return bb.emit(relax.call_tir(gv, [x], relax.TensorType(x.ty.shape, "float32")))

    def dense(self, bb, x, entry: WeightEntry, vars_, name):
        rows = x.ty.shape[0]
        if not entry.kernel and "weight" in entry.arrays and isinstance(rows, tirx.IntImm) and int(rows) == 1:
            # a float weight too small for the kernels (a router): one GEMV on the stored weight, not a
            # per-call cast + transpose copy of it and a matmul (scheduled by cpu_rules' InnerReductionGemv)
            return bb.emit_te(te_ops.float_gemv, x, vars_[f"{name}.weight"], primfunc_name_hint="float_gemv")
        if not entry.kernel:
            return super().dense(bb, x, entry, vars_, name)
        ids = relax.const(np.zeros(1, np.int32))
        return self._call(bb, x, entry, vars_, name, ids, 1, False)

    def routed_experts(self, bb, x, entry: WeightEntry, vars_, name, ids):
        if not entry.kernel:
            return super().routed_experts(bb, x, entry, vars_, name, ids)
        return self._call(bb, x, entry, vars_, name, ids, int(ids.ty.shape[0]), int(x.ty.shape[0]) != 1)

    def experts(self, bb, x, entry: WeightEntry, vars_, name, ids):
        if not entry.kernel:
            return super().experts(bb, x, entry, vars_, name, ids)
        top_k = int(ids.ty.shape[0])
        per_expert = int(x.ty.shape[0]) != 1
        if zeroes_unrouted_rows(self._kernel(entry, top_k, per_expert)):  # rows of id -1 come back 0: no mask
            return self._call(bb, x, entry, vars_, name, ids, top_k, per_expert)
        is_member = bb.emit(relax.op.greater_equal(ids, relax.const(np.int32(0))))
        member = bb.emit(relax.op.reshape(is_member, (top_k, 1)))
        if has_row_guard(self._kernel(entry, top_k, per_expert)):
            y = self._call(bb, x, entry, vars_, name, ids, top_k, per_expert)
            return bb.emit(relax.op.where(member, y, relax.const(np.float32(0.0))))
        big = relax.const(np.int32(1 << 30))
        first = bb.emit(relax.op.min(relax.op.where(is_member, ids, big), axis=0, keepdims=True))
        first = bb.emit(relax.op.where(relax.op.equal(first, big), relax.const(np.int32(0)), first))
        safe = bb.emit(relax.op.where(is_member, ids, first))
        y = self._call(bb, x, entry, vars_, name, safe, top_k, per_expert)
        return bb.emit(relax.op.where(member, y, relax.const(np.float32(0.0))))

    def swiglu_experts(self, bb, x, gate: WeightEntry, up: WeightEntry, vars_, gate_name, up_name, ids):
        """One int8 SwiGLU GEMV (``make_gemv(swiglu=True, separate_up=True)``) reading the unfused ``w1`` and ``w3``
        stacks as they are; None (two GEMVs instead) unless both are kernel-layout weights of one format with int8
        activations and the family has the kernel. Its rows of id -1 are 0, so no ``where`` follows it."""
        shape = (gate.bits, gate.shape, gate.group_size, gate.stacked or 1, gate.scales)
        if not (gate.kernel and up.kernel and self._int8(gate)) \
                or shape != (up.bits, up.shape, up.group_size, up.stacked or 1, up.scales):
            return None
        n, k = gate.shape
        top_k, per_expert = int(ids.ty.shape[0]), int(x.ty.shape[0]) != 1
        key = ("swiglu", gate.bits, n, k, gate.group_size, gate.stacked or 1, top_k, per_expert, gate.scales)
        if key not in self._kernels:
            try:
                self._kernels[key] = make_gemv(*key[1:7], self.target, x_per_expert=per_expert, activations="int8",
                                               swiglu=True, separate_up=True, scales=gate.scales)
            except MoecError:  # no int8 SwiGLU kernel in this family (ARM): the unfused GEMVs
                self._kernels[key] = None
        if self._kernels[key] is None:
            return None
        gv = add_kernel(bb, self._kernels[key],
                        _symbol("swiglu", gate, f"t{top_k}", "xe" if per_expert else "", "i8"))
        args = [x] + self._weight_args(gate, vars_, gate_name) + self._weight_args(up, vars_, up_name) + [ids]
        return bb.emit(relax.call_tir(gv, args, relax.TensorType((top_k, n), "float32")))


def _grouped_rows(bb, x, rows, int8: bool):
    """``(x, rows)`` as a grouped GEMM takes them: an int8 kernel gathers ``x[rows]`` itself (``rows`` None: every
    row of ``x`` in order), a float32 one takes the rows already gathered (``rows`` None after)."""
    if rows is not None and not int8:
        return bb.emit(relax.op.take(x, rows, axis=0, mode="clip")), None
    if int8 and rows is None:
        return x, bb.emit(relax.op.arange(0, x.ty.shape[0], 1, "int32"))
    return x, rows


def _symbol(kind: str, entry: WeightEntry, *extra: str) -> str:
    """One library symbol per distinct kernel (bits, shape, group, stack, call shape), shared by every weight
    that uses it: layers of one shape compile once, not once per layer."""
    n, k = entry.shape
    tail = "".join(f"_{e}" for e in extra if e)
    scales = "" if entry.scales == DEFAULT_SCALES or entry.bits == 16 else f"_{entry.scales}"
    return f"{kind}_b{entry.bits}_n{n}_k{k}_g{entry.group_size}{scales}_s{entry.stacked or 1}{tail}"


def apply_kernel_layout(params: ModelParams, emitter: LinearEmitter) -> int:
    """Re-lay out every weight of ``params`` the emitter's kernels want in their own layout (in place,
    ``LinearEmitter.relayout``); returns how many."""
    return sum(emitter.relayout(name, entry) for name, entry in params.entries.items())
