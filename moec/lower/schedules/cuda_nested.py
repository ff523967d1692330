"""CUDA nested GEMV with one body per run-time width (hand-written TIR, threads bound).

The fused TE form (``gpu_linear.expert_nested_gemv``) assembles every weight's code from all bit-plane
segments, each extraction under its width test: its arithmetic is the storage width's at every width,
and on a GPU the GEMV is ALU-bound (H200: 0.44–0.64x the fixed GEMV). Here a thread block serves one
routed row, whose width is uniform across the block, and branches once on it to a body that reads and
decodes only that width's segments:

- one warp per output row, ``rows`` rows a block; each lane a run of ``vector`` consecutive k per step
  (inside one quantization group), its activations copied into registers with float4 loads and each
  needed segment's bytes with one vector load;
- the run's codes are assembled in the width's own units (segment ``s`` shifted to ``pos_s − t``,
  ``t = storage − width``: a 2-bit width is one 2-bit extraction a weight), and the group's affine
  terms are applied once per run: ``Σ w x = scale·2**t·(Σ q_t x − z' Σ x)`` with
  ``z' = (zero − (2**t − 1)/2) / 2**t``, the bin-centre rule of ``moec.quant.nested``;
- the lanes' partial sums are added with warp shuffles (``bind=False``: serial loops and a 32-entry
  partial buffer instead, the same bodies, so the CPU can check the numerics).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.core.formats import get_nested_format
from moec.quant.nested import segment_positions, segments_for

LANES = 32


@functools.lru_cache(maxsize=None)  # one parse per shape (about 0.1 s each): a model's layers share a few
def cuda_nested_gemv(storage_bits: int, n: int, k: int, experts: int, top_k: int, group: int, xr: int,
                     vector: int = 8, rows: int = 4, bind: bool = True) -> tirx.PrimFunc:
    """``gemv(x [xr, k], seg0…, scale, zero, prec [E], ids [top_k], y [top_k, n])`` (ids all valid)."""
    fmt = get_nested_format(storage_bits)
    segb, widths, positions = fmt.segment_bits, fmt.derived_bits, segment_positions(fmt)
    nseg = len(segb)
    if k % (LANES * vector) or group % vector or vector % 8 or n % rows or xr not in (1, top_k):
        raise MoecError(f"cuda nested GEMV: k={k}, group={group}, n={n} do not fit runs of {vector} "
                        f"on {LANES} lanes and {rows} rows")
    steps = k // (LANES * vector)
    zbytes = -(-(k // group) * storage_bits // 8)
    run = [vector * b // 8 for b in segb]  # bytes of each segment per lane step
    blocks = top_k * (n // rows)

    def code(sl, d: int, v: int):
        """Code of run element ``v`` at width index ``d``, in the width's units (Python-level unrolled)."""
        t = storage_bits - widths[d]
        q = None
        for s in range(segments_for(fmt, widths[d])):
            bit = v * segb[s]
            part = (T.Cast("uint32", sl[s, bit // 8]) >> T.uint32(bit % 8)) & T.uint32((1 << segb[s]) - 1)
            if positions[s] - t:
                part = part << T.uint32(positions[s] - t)
            q = part if q is None else q | part
        return T.Cast("float32", q)

    def xrow(j):
        return j if xr > 1 else 0

    def zero_code(zero, e, row, g):
        bit = g * storage_bits
        return T.Cast("float32", (T.Cast("uint32", zero[e, row, bit // 8]) >> T.Cast("uint32", bit % 8))
                      & T.uint32((1 << storage_bits) - 1))

    def make_body(d: int):
        used = segments_for(fmt, widths[d])
        t = storage_bits - widths[d]
        unit = float(1 << t)
        centre = (unit - 1.0) / 2.0

        @T.macro
        def body(x, segs, scale, zero, acc, xl, sl, e, j, row, lane):
            for ko in range(steps):
                for h in range(vector // 4):
                    for i in T.vectorized(4):
                        xl[h * 4 + i] = x[xrow(j), (ko * LANES + lane) * vector + h * 4 + i]
                for i in T.vectorized(run[0]):
                    sl[0, i] = segs[0][e, row, (ko * LANES + lane) * run[0] + i]
                if used > 1:
                    for i in T.vectorized(run[1]):
                        sl[1, i] = segs[1][e, row, (ko * LANES + lane) * run[1] + i]
                if used > 2:
                    for i in T.vectorized(run[2]):
                        sl[2, i] = segs[2][e, row, (ko * LANES + lane) * run[2] + i]
                if used > 3:
                    for i in T.vectorized(run[3]):
                        sl[3, i] = segs[3][e, row, (ko * LANES + lane) * run[3] + i]
                acc[1] = T.float32(0)
                acc[2] = T.float32(0)
                for v in T.unroll(vector):
                    acc[1] = acc[1] + xl[v] * code(sl, d, v)
                    acc[2] = acc[2] + xl[v]
                acc[0] = acc[0] + T.Cast("float32", scale[e, row, (ko * LANES + lane) * vector // group]) * T.float32(unit) * (
                    acc[1] - (zero_code(zero, e, row, (ko * LANES + lane) * vector // group) - T.float32(centre))
                    * T.float32(1.0 / unit) * acc[2])
        return body

    bodies = [make_body(d) for d in range(len(widths))]
    four = len(widths) == 4

    @T.macro
    def lane_sum(x, segs, scale, zero, prec, ids, acc, xl, sl, j, row, lane):
        acc[0] = T.float32(0)
        if prec[ids[j]] == widths[0]:
            bodies[0](x, segs, scale, zero, acc, xl, sl, ids[j], j, row, lane)
        elif prec[ids[j]] == widths[1]:
            bodies[1](x, segs, scale, zero, acc, xl, sl, ids[j], j, row, lane)
        elif four and prec[ids[j]] == widths[2]:
            bodies[2](x, segs, scale, zero, acc, xl, sl, ids[j], j, row, lane)
        else:  # the widest (the session refuses widths the format does not serve)
            bodies[-1](x, segs, scale, zero, acc, xl, sl, ids[j], j, row, lane)

    @T.macro
    def bound(x, segs, scale, zero, prec, ids, y):
        for b in T.thread_binding(blocks, thread="blockIdx.x"):
            for r in T.thread_binding(rows, thread="threadIdx.y"):
                for lane in T.thread_binding(LANES, thread="threadIdx.x"):
                    acc = T.alloc_buffer((3,), "float32", scope="local")
                    xl = T.alloc_buffer((vector,), "float32", scope="local")
                    sl = T.alloc_buffer((nseg, max(run)), "uint8", scope="local")
                    lane_sum(x, segs, scale, zero, prec, ids, acc, xl, sl, b // (n // rows),
                             b % (n // rows) * rows + r, lane)
                    for o in T.unroll(5):
                        acc[0] = acc[0] + T.tvm_warp_shuffle_down(
                            T.tvm_warp_activemask(), acc[0], 16 >> o, LANES, LANES)
                    if lane == 0:
                        y[b // (n // rows), b % (n // rows) * rows + r] = acc[0]

    @T.macro
    def serial(x, segs, scale, zero, prec, ids, y):
        for b in range(blocks):
            for r in range(rows):
                part = T.alloc_buffer((LANES,), "float32")
                for lane in range(LANES):
                    acc = T.alloc_buffer((3,), "float32")
                    xl = T.alloc_buffer((vector,), "float32")
                    sl = T.alloc_buffer((nseg, max(run)), "uint8")
                    lane_sum(x, segs, scale, zero, prec, ids, acc, xl, sl, b // (n // rows),
                             b % (n // rows) * rows + r, lane)
                    part[lane] = acc[0]
                y[b // (n // rows), b % (n // rows) * rows + r] = T.float32(0)
                for lane in range(LANES):
                    y[b // (n // rows), b % (n // rows) * rows + r] = (
                        y[b // (n // rows), b % (n // rows) * rows + r] + part[lane])

    def seg_shape(s):
        return (experts, n, k * segb[s] // 8)

    groups = k // group
    if nseg == 4:
        @T.prim_func
        def gemv(x: T.Buffer((xr, k), "float32"), seg0: T.Buffer(seg_shape(0), "uint8"),
                 seg1: T.Buffer(seg_shape(1), "uint8"), seg2: T.Buffer(seg_shape(2), "uint8"),
                 seg3: T.Buffer(seg_shape(3), "uint8"), scale: T.Buffer((experts, n, groups), "float16"),
                 zero: T.Buffer((experts, n, zbytes), "uint8"), prec: T.Buffer((experts,), "int32"),
                 ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
            T.func_attr({"global_symbol": "expert_nested_gemv", "tirx.noalias": True, "tirx.is_scheduled": True})
            if bind:
                bound(x, [seg0, seg1, seg2, seg3], scale, zero, prec, ids, y)
            else:
                serial(x, [seg0, seg1, seg2, seg3], scale, zero, prec, ids, y)
    elif nseg == 3:
        @T.prim_func
        def gemv(x: T.Buffer((xr, k), "float32"), seg0: T.Buffer(seg_shape(0), "uint8"),
                 seg1: T.Buffer(seg_shape(1), "uint8"), seg2: T.Buffer(seg_shape(2), "uint8"),
                 scale: T.Buffer((experts, n, groups), "float16"),
                 zero: T.Buffer((experts, n, zbytes), "uint8"), prec: T.Buffer((experts,), "int32"),
                 ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
            T.func_attr({"global_symbol": "expert_nested_gemv", "tirx.noalias": True, "tirx.is_scheduled": True})
            if bind:
                bound(x, [seg0, seg1, seg2], scale, zero, prec, ids, y)
            else:
                serial(x, [seg0, seg1, seg2], scale, zero, prec, ids, y)
    else:
        raise MoecError(f"{fmt.name}: the CUDA nested GEMV takes 3 or 4 segments, not {nseg}")
    return gemv
