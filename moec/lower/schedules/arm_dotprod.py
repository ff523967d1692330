"""ARM dotprod (ARMv8.2-A ``sdot``) decode GEMV with int8 activations, written as explicit TIR.

Like the x86 VNNI kernel it is written with vector loads and an LLVM intrinsic
(``llvm.aarch64.neon.sdot.v4i32.v16i8``) rather than by ``tensorize`` (which crashes in
apache-tvm 0.27.0.post1). ``sdot`` multiplies signed bytes, so 8-bit codes (0..255) are
recentred to -128..127 (``^ 0x80``) and the zero point is shifted by 128 to match; 2- and 4-bit
codes fit a signed byte as they are. 3-bit codes would need a byte shuffle per step and are not
offered (the float32-activation kernel serves them). Numerics:
:func:`moec.lower.kernels.activations.quantize_activations`.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from collections.abc import Callable
from math import gcd

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.layout import num_tiles, zero_words
from moec.lower.kernels.scopes import stack_scope
from moec.lower.kernels.signature import UNUSED, drop_params
from moec.lower.schedules.int8_common import (BYTE_MASK, plane_slot_source, quantize_activations_prep,
                                              scaled_group_sum)

#: Bit widths with an ARM int8-activation kernel.
DOTPROD_BITS: tuple[int, ...] = (2, 4, 8)

LANES = 4  # int32 rows per 128-bit vector


def _splat(value: int, dtype: str, lanes: int = LANES):
    return T.Broadcast(tirx.const(value, dtype), lanes)


def sdot(acc, a, b):
    """``acc[i] + sum_j a[4i+j] * b[4i+j]`` (int32x4, int8x16, int8x16): one ``sdot`` instruction."""
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, a, b)


def portable_dot(acc, a, b):
    """What :func:`sdot` computes, in plain vector TIR that any LLVM target compiles (for tests)."""
    ai, bi = T.reinterpret("int32x4", a), T.reinterpret("int32x4", b)
    for j in range(4):
        up = _splat(24 - 8 * j, "int32")
        acc = acc + ((ai << up) >> _splat(24, "int32")) * ((bi << up) >> _splat(24, "int32"))
    return acc


def dotprod_gemv(spec: GemvSpec, params, dot: Callable = sdot) -> tirx.PrimFunc:
    """The int8-activation GEMV for ``spec`` on 4-lane int32 vectors (one output row per lane).

    Per word of a row (``32/b`` codes) and vector of 4 rows, plane ``t`` (codes ``m*P + t`` in
    byte ``m``, ``P = 8/b``) is one ``dot`` against four int8 activations broadcast to all rows
    (``x8`` is stored in the order the dots consume it). Group sums are scaled once per group.
    ``params`` is an :class:`~moec.lower.schedules.arm.ArmParams`; ``dot`` is :func:`sdot` (or
    :func:`portable_dot` to check the kernel's indexing on a host without dotprod).
    Parameters of the PrimFunc: as the float32-activation GEMV's.
    """
    bits, n, k, gs, tile = spec.bits, spec.n, spec.k, spec.group_size, spec.tile
    if spec.swiglu:
        raise MoecError("no ARM int8-activation SwiGLU GEMV (use activations='float32')")
    if bits not in DOTPROD_BITS:
        raise MoecError(f"no ARM int8-activation GEMV for {bits}-bit weights; choices: "
                        f"{', '.join(map(str, DOTPROD_BITS))}")
    planes, step_codes = 8 // bits, 32 // bits
    if gs % step_codes:
        raise MoecError(f"{bits}-bit int8-activation GEMV needs group_size a multiple of {step_codes}")
    if n % LANES or tile % LANES:
        raise MoecError(f"the ARM int8 GEMV needs N ({n}) and the tile ({tile}) to be multiples of {LANES}")
    experts, top_k, vecs = spec.num_stacked, spec.top_k, params.int8_tile_vectors
    nb, groups, steps_per_group = n // LANES, k // gs, gs // step_codes
    tiles = -(-nb // vecs)
    vl = gcd(gs, LANES)
    xr = top_k if spec.x_per_expert else 1
    xstride = 1 if spec.x_per_expert else 0
    recentre = 128 if bits == 8 else 0

    prep = quantize_activations_prep(xr, k, gs, vl, step_codes, plane_slot_source(bits))

    def accumulate(acc, v, weight, x8, e, gv, step, r):
        word = weight[e, gv * LANES // tile, step, T.ramp(gv * LANES % tile, 1, LANES)]
        total = acc[v, T.ramp(0, 1, LANES)]
        for t in range(planes):
            codes = (word >> _splat(t * bits, "uint32")) & _splat(BYTE_MASK[bits], "uint32")
            if recentre:
                codes = codes ^ _splat(0x80808080, "uint32")
            x4 = T.reinterpret("int8x16", T.Broadcast(
                T.reinterpret("int32", x8[r, T.ramp(step * step_codes + 4 * t, 1, 4)]), LANES))
            total = dot(total, T.reinterpret("int8x16", codes), x4)
        return total

    sg = spec.super_groups

    def group_term(dot_sum, scale, zero, sx, xsum, e, gv, g, lane, r, sup):
        """``scale * sx * (sum q*x8 - zero * sum x8)`` (codes and zero both recentred for 8 bits)."""
        t, col = gv * LANES // tile, gv * LANES % tile + lane
        return scaled_group_sum(dot_sum, scale, zero, sx, xsum, e, t, col, g, r, bits, recentre,
                                super_scale=sup, super_groups=sg)

    @T.macro
    def body(x, weight, scale, sup, zero, expert_ids, y):
        sx = T.alloc_buffer((xr, groups), "float32")
        xsum = T.alloc_buffer((xr, groups), "int32")
        xq = T.alloc_buffer((xr, k), "int8")
        x8 = T.alloc_buffer((xr, k), "int8")
        prep(x, sx, xsum, xq, x8)
        for task in T.parallel(top_k * tiles):  # tile-major (int8_common: routed task order)
            # register tiles on the stack where they fit, the expert id read in place: a "local"
            # buffer or a bound scalar is a TVM workspace alloc/free per task (kernels/scopes.py)
            acc = T.alloc_buffer((vecs, LANES), "int32", scope=stack_scope(vecs * LANES * 4))
            yacc = T.alloc_buffer((vecs, LANES), "float32", scope=stack_scope(vecs * LANES * 4))
            for v in T.unroll(vecs):
                for lane in T.vectorized(LANES):
                    yacc[v, lane] = T.float32(0)
            for g in range(groups):
                for v in T.unroll(vecs):
                    for lane in T.vectorized(LANES):
                        acc[v, lane] = 0
                for st in range(steps_per_group):
                    for v in T.unroll(vecs):
                        if task // top_k * vecs + v < nb:
                            acc[v, T.ramp(0, 1, LANES)] = accumulate(
                                acc, v, weight, x8, expert_ids[task % top_k], task // top_k * vecs + v,
                                g * steps_per_group + st, task % top_k * xstride)
                for v in T.unroll(vecs):
                    if task // top_k * vecs + v < nb:
                        for lane in T.vectorized(LANES):
                            yacc[v, lane] = yacc[v, lane] + group_term(
                                acc[v, lane], scale, zero, sx, xsum, expert_ids[task % top_k],
                                task // top_k * vecs + v, g, lane, task % top_k * xstride, sup)
            for v in T.unroll(vecs):
                if task // top_k * vecs + v < nb:
                    for lane in T.vectorized(LANES):
                        y[task % top_k, (task // top_k * vecs + v) * LANES + lane] = yacc[v, lane]

    nt, zw = num_tiles(n, tile), zero_words(groups, bits)
    dq = sg > 0  # double-quantized scales: uint8 codes and fp16 super-scales
    sdt, sup_shape = ("uint8", (experts, nt, (groups + sg - 1) // sg, tile)) if dq else ("float16", UNUSED)

    @T.prim_func  # (without super-scales, kernels/signature.py drops the parameter)
    def gemv(x: T.Buffer((xr, k), "float32"), weight: T.Buffer((experts, nt, k * bits // 32, tile), "uint32"),
             scale: T.Buffer((experts, nt, groups, tile), sdt), super_scale: T.Buffer(sup_shape, "float16"),
             zero: T.Buffer((experts, nt, zw, tile), "uint32"),
             expert_ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
        T.func_attr({"global_symbol": "gemv", "tirx.noalias": True})
        body(x, weight, scale, super_scale if dq else None, zero, expert_ids, y)

    return drop_params(gemv, [] if dq else ["super_scale"])
