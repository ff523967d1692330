"""CUDA decode GEMVs, hand-written TIR with threads bound: one body per run-time width.

Written for nested stacks (:func:`cuda_nested_gemv`); fixed-width stacks (one segment, one width) take
the same bodies (:func:`cuda_fixed_gemv`; dense layers as a stack of one expert), and both have a
SwiGLU form computing a layer's routed gate and up rows together (``silu(gate x) · (up x)``). The fused
TE form (``gpu_linear.expert_nested_gemv``) assembles every weight's code from all bit-plane segments,
each extraction under its width test: its arithmetic is the storage width's at every width, and on a
GPU the GEMV is ALU-bound (H200: 0.44–0.64x the fixed GEMV). Here a thread block serves routed rows of
one expert, whose width is uniform across the block, and branches once on it to a body that reads and
decodes only that width's segments:

- ``rows`` warps a block, each warp ``per_warp`` consecutive output rows sharing its activations; each
  lane a run of ``vector`` consecutive k per step (inside one quantization group), its activations
  copied into registers with float4 loads (and summed once for all its rows), each needed segment's
  bytes with one vector load per row, every row's loads issued before the arithmetic;
- the run's codes are assembled in the width's own units (segment ``s`` shifted to ``pos_s − t``,
  ``t = storage − width``: a 2-bit width is one 2-bit extraction a weight; with ``words``, a width of two
  or more segments assembles eight codes at a time, :func:`spread`) and made float32 either by a
  conversion instruction or (``magic``) by or-ing the code into the mantissa of ``2**23`` and
  subtracting ``2**23`` (exact for codes below ``2**23``: the same values, integer/logic and add
  instructions instead of the conversion unit);
- the group's affine terms are applied once per run: ``Σ w x = scale·2**t·(Σ q_t x − z' Σ x)`` with
  ``z' = (zero − (2**t − 1)/2) / 2**t``, the bin-centre rule of ``moec.quant.nested`` (``t = 0`` and
  ``z' = zero`` for a fixed stack);
- the lanes' partial sums are added with warp shuffles (``bind=False``: serial loops and a partial
  buffer instead, the same bodies, so the CPU can check the numerics).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.signature import UNUSED, drop_params, segment_names
from moec.lower.schedules import cuda_gemv_int8
from moec.lower.schedules.cuda_codes import LANES, Codes, code_bits, fixed_codes, nested_codes, row_outputs, spread
from moec.quant.pack import packed_row_bytes

#: Output rows a warp computes (sharing its activations in registers), the most of these that divides the
#: rows: 4 was fastest or within 3 % of it at every width, fixed and nested, in the H200 sweep
#: (``benchmarks/gpu_gemv_variants.py``: 1, 2, 4 and 8 at DRAM size and on the OLMoE shape).
PER_WARP = (4, 2, 1)
#: k per lane step of a fixed stack by its width (where k and the groups divide into such runs, else 8): 16
#: was 8–13 % faster than 8 at 2, 3 and 4 bits at DRAM size on the H200, equal at 8 bits (memory-bound
#: there, 96–100 % of the copy bandwidth); nested stacks keep 8 (16 was 0–9 % slower at 3, 4 and 8 bits).
FIXED_VECTOR = {2: 16, 3: 16, 4: 16, 8: 8}
MAGIC = 0x4B000000  # float32 2**23: a code below 2**23 or-ed into its mantissa reads as 2**23 + code


def _per_warp(n: int, rows: int) -> int:
    return next((p for p in PER_WARP if n % (rows * p) == 0), 1)


def _check(codes: Codes, n: int, k: int, group: int, xr: int, top_k: int, vector: int, rows: int,
           per_warp: int) -> None:
    if (k % (LANES * vector) or group % vector or vector % 8 or n % (rows * per_warp)
            or xr not in (1, top_k)):
        raise MoecError(f"cuda expert GEMV: k={k}, group={group}, n={n} do not fit runs of {vector} "
                        f"on {LANES} lanes and {rows}x{per_warp} rows")


def _kernel(codes: Codes, n: int, k: int, top_k: int, group: int, xr: int, vector: int,
            rows: int, per_warp: int, magic: bool, words: bool, bind: bool, swiglu: bool = False):
    """The macro ``bound``/``serial`` (``x, segs, scales, zeros, prec or None, ids, y``) of the kernel: ``segs``
    the stack's segments (with ``swiglu``, the gate's then the up stack's), ``scales``/``zeros`` one per stack."""
    segb, widths, positions, nseg = codes.segb, codes.widths, codes.positions, len(codes.segb)
    steps = k // (LANES * vector)
    run = [vector * b // 8 for b in segb]  # bytes of each segment per lane step
    span = rows * per_warp  # output rows a block
    blocks = top_k * (n // span)
    R = per_warp
    H = 2 if swiglu else 1  # stacks a row reads: SwiGLU computes the gate's and the up's rows together
    HR = H * R  # acc: one sum per (stack, row); then Σx of the run, then a run's dot

    def code(sl, slot, d: int, v):
        """Float32 code of run element ``v`` of row slot ``slot`` at width index ``d``, in the width's units."""
        t = codes.storage - widths[d]
        q = None
        for s in range(codes.used[d]):
            part = code_bits(lambda i, s=s: sl[slot * nseg + s, i], v * segb[s], segb[s], run[s] - 1)
            if positions[s] - t:
                part = part << T.uint32(positions[s] - t)
            q = part if q is None else q | part
        return to_float(q)

    def to_float(q):
        if magic:
            return T.reinterpret("float32", q | T.uint32(MAGIC)) - T.float32(1 << 23)
        return T.Cast("float32", q)

    def chunk_words(sl, slot, d: int, c):
        """(even, odd) words of chunk ``c`` (8 run elements) of row slot ``slot`` at width index ``d``: each
        segment's bytes of the chunk read as one word and spread to its bits of the 8 codes' bytes."""
        t = codes.storage - widths[d]
        lo = hi = None
        for s in range(codes.used[d]):
            nb = segb[s]  # bytes of 8 values
            word = T.Cast("uint32", sl[slot * nseg + s, c * nb])
            for i in range(1, nb):
                word = word | (T.Cast("uint32", sl[slot * nseg + s, c * nb + i]) << T.uint32(8 * i))
            a, b = spread(word, segb[s], positions[s] - t)
            lo, hi = (a, b) if lo is None else (lo | a, hi | b)
        return lo, hi

    def word_code(wd, v):
        return to_float((wd[v % 2] >> T.Cast("uint32", 8 * (v // 2))) & T.uint32(0xFF))

    def xrow(j):
        return j if xr > 1 else 0

    def zero_code(zero, e, row, g):
        return T.Cast("float32", code_bits(lambda i: zero[e, row, i], g * codes.storage, codes.storage,
                                            int(zero.shape[-1]) - 1))

    def make_body(d: int):
        used = codes.used[d]
        by_words = words and used > 1 and codes.storage <= 8
        t = codes.storage - widths[d]
        unit = float(1 << t)
        centre = (unit - 1.0) / 2.0

        @T.macro
        def load(segs, sl, e, row, slot, s, src, base):
            if run[s] in (1, 2, 4, 8, 16):  # one vector load (CUDA has no 3- or 6-byte vectors)
                for i in T.vectorized(run[s]):
                    sl[slot * nseg + s, i] = segs[src][e, row, base * run[s] + i]
            else:
                for i in T.unroll(run[s]):
                    sl[slot * nseg + s, i] = segs[src][e, row, base * run[s] + i]

        @T.macro
        def load_stack(segs, sl, e, row0, h, base):
            for r in T.unroll(R):
                load(segs, sl, e, row0 + r, h * R + r, 0, h * nseg, base)
                if used > 1:
                    load(segs, sl, e, row0 + r, h * R + r, 1, h * nseg + 1, base)
                if used > 2:
                    load(segs, sl, e, row0 + r, h * R + r, 2, h * nseg + 2, base)
                if used > 3:
                    load(segs, sl, e, row0 + r, h * R + r, 3, h * nseg + 3, base)

        @T.macro
        def dot_stack(scales, zeros, acc, xl, sl, wd, e, row0, h, g):
            for r in T.unroll(R):
                acc[HR + 1] = T.float32(0)
                if by_words:
                    for c in T.unroll(vector // 8):
                        wd[0] = chunk_words(sl, h * R + r, d, c)[0]
                        wd[1] = chunk_words(sl, h * R + r, d, c)[1]
                        for v in T.unroll(8):
                            acc[HR + 1] = acc[HR + 1] + xl[c * 8 + v] * word_code(wd, v)
                else:
                    for v in T.unroll(vector):
                        acc[HR + 1] = acc[HR + 1] + xl[v] * code(sl, h * R + r, d, v)
                acc[h * R + r] = acc[h * R + r] + T.Cast("float32", scales[h][e, row0 + r, g]) * T.float32(unit) * (
                    acc[HR + 1] - (zero_code(zeros[h], e, row0 + r, g) - T.float32(centre))
                    * T.float32(1.0 / unit) * acc[HR])

        @T.macro
        def body(x, segs, scales, zeros, acc, xl, sl, wd, e, j, row0, lane):
            for ko in range(steps):
                for q in range(vector // 4):
                    for i in T.vectorized(4):
                        xl[q * 4 + i] = x[xrow(j), (ko * LANES + lane) * vector + q * 4 + i]
                load_stack(segs, sl, e, row0, 0, ko * LANES + lane)
                if H == 2:
                    load_stack(segs, sl, e, row0, 1, ko * LANES + lane)
                acc[HR] = T.float32(0)
                for v in T.unroll(vector):
                    acc[HR] = acc[HR] + xl[v]
                dot_stack(scales, zeros, acc, xl, sl, wd, e, row0, 0, (ko * LANES + lane) * vector // group)
                if H == 2:
                    dot_stack(scales, zeros, acc, xl, sl, wd, e, row0, 1, (ko * LANES + lane) * vector // group)
        return body

    bodies = [make_body(d) for d in range(len(widths))]
    nw = len(widths)

    @T.macro
    def lane_sum(x, segs, scales, zeros, prec, ids, acc, xl, sl, wd, j, row0, lane):
        for r in T.unroll(HR):
            acc[r] = T.float32(0)
        if nw == 1:
            bodies[0](x, segs, scales, zeros, acc, xl, sl, wd, ids[j], j, row0, lane)
        elif prec[ids[j]] == widths[0]:
            bodies[0](x, segs, scales, zeros, acc, xl, sl, wd, ids[j], j, row0, lane)
        elif prec[ids[j]] == widths[1]:
            bodies[1](x, segs, scales, zeros, acc, xl, sl, wd, ids[j], j, row0, lane)
        elif nw == 4 and prec[ids[j]] == widths[2]:
            bodies[2](x, segs, scales, zeros, acc, xl, sl, wd, ids[j], j, row0, lane)
        else:  # the widest (the session refuses widths the format does not serve)
            bodies[-1](x, segs, scales, zeros, acc, xl, sl, wd, ids[j], j, row0, lane)

    result, store = row_outputs(R, H)

    @T.macro
    def bound(x, segs, scales, zeros, prec, ids, y):
        for b in T.thread_binding(blocks, thread="blockIdx.x"):
            for w in T.thread_binding(rows, thread="threadIdx.y"):
                for lane in T.thread_binding(LANES, thread="threadIdx.x"):
                    acc = T.alloc_buffer((HR + 2,), "float32", scope="local")
                    xl = T.alloc_buffer((vector,), "float32", scope="local")
                    sl = T.alloc_buffer((HR * nseg, max(run)), "uint8", scope="local")
                    wd = T.alloc_buffer((2,), "uint32", scope="local")
                    lane_sum(x, segs, scales, zeros, prec, ids, acc, xl, sl, wd, b // (n // span),
                             b % (n // span) * span + w * R, lane)
                    store(acc, y, b // (n // span), b % (n // span) * span + w * R, lane)

    @T.macro
    def serial(x, segs, scales, zeros, prec, ids, y):
        for b in range(blocks):
            for w in range(rows):
                part = T.alloc_buffer((HR,), "float32")
                for r in range(HR):
                    part[r] = T.float32(0)
                for lane in range(LANES):
                    acc = T.alloc_buffer((HR + 2,), "float32")
                    xl = T.alloc_buffer((vector,), "float32")
                    sl = T.alloc_buffer((HR * nseg, max(run)), "uint8")
                    wd = T.alloc_buffer((2,), "uint32")
                    lane_sum(x, segs, scales, zeros, prec, ids, acc, xl, sl, wd, b // (n // span),
                             b % (n // span) * span + w * R, lane)
                    for r in range(HR):
                        part[r] = part[r] + acc[r]
                for r in range(R):
                    y[b // (n // span), b % (n // span) * span + w * R + r] = result(part, r)

    return bound if bind else serial


def _vector(codes: Codes, k: int, group: int, activations: str, choices: tuple[int, ...], default: int) -> int:
    """The first run length of ``choices`` the shape takes (``default`` where none does: the check says why)."""
    def fits(v: int) -> bool:
        if activations != "int8":
            return k % (LANES * v) == 0 and group % v == 0
        try:
            cuda_gemv_int8.check_int8(codes, k, group, v)
        except MoecError:
            return False
        return True
    return next((v for v in choices if fits(v)), default)


def _make_kernel(codes: Codes, n: int, k: int, top_k: int, group: int, xr: int, vector: int, rows: int,
                 per_warp: int | None, magic: bool, words: bool, bind: bool, swiglu: bool, activations: str,
                 run_layout: bool = False, tiles: int | None = None):
    """The kernel macro of ``activations`` (float32: :func:`_kernel`; int8: ``cuda_gemv_int8.kernel_int8``)."""
    per_warp = per_warp or _per_warp(n, rows)
    _check(codes, n, k, group, xr, top_k, vector, rows, per_warp)
    if activations == "int8":
        cuda_gemv_int8.check_int8(codes, k, group, vector)
        return cuda_gemv_int8.kernel_int8(codes, n, k, top_k, group, xr, vector, rows, per_warp, bind, swiglu,
                                          run_layout, tiles)
    if activations != "float32" or run_layout or tiles:
        raise MoecError(f"the CUDA expert GEMV takes float32 or int8 activations (run layout and tiles: int8), "
                        f"not {activations!r}")
    return _kernel(codes, n, k, top_k, group, xr, vector, rows, per_warp, magic, words, bind, swiglu)


@functools.lru_cache(maxsize=None)  # one parse per shape (about 0.1 s each): a model's layers share a few
def cuda_nested_gemv(storage_bits: int, n: int, k: int, experts: int, top_k: int, group: int, xr: int,
                     vector: int | None = None, rows: int = 4, per_warp: int | None = None, magic: bool = False,
                     words: bool = True, swiglu: bool = False, bind: bool = True,
                     activations: str = "float32", run_layout: bool = False, tiles: int | None = None
                     ) -> tirx.PrimFunc:
    """``gemv(x [xr, k], seg0…, scale, zero, prec [E], ids [top_k], y [top_k, n])`` (ids all valid);
    ``words``: widths of two or more segments assemble a run's codes eight at a time (:func:`spread`).
    ``swiglu``: ``gemv(x, seg0…, scale, zero, up_seg0…, up_scale, up_zero, prec, ids, y)``, ``y`` the routed
    rows' ``silu(gate x) · (up x)`` (the gate and up stacks share ``prec``). ``activations="int8"``: the bodies of
    :mod:`cuda_gemv_int8` (``x`` still float32, quantized in the kernel; ``vector`` by default the longest run of
    32, 16 or 8 the shape takes; ``run_layout``: the segments in ``kernels/cuda_layout.py``'s layout, runs of 32;
    ``tiles``: row tiles a block, ``cuda_gemv_int8.block_tiles`` by default)."""
    codes = nested_codes(storage_bits)
    choices = (cuda_gemv_int8.NESTED_VECTOR, 16, 8) if activations == "int8" else (8,)
    vector = vector or _vector(codes, k, group, activations, choices, 8)
    kernel = _make_kernel(codes, n, k, top_k, group, xr, vector, rows, per_warp, magic, words, bind, swiglu,
                          activations, run_layout, tiles)
    zbytes = packed_row_bytes(k // group, storage_bits)
    groups = k // group
    name = "expert_nested_swiglu" if swiglu else "expert_nested_gemv"

    def seg_shape(s):
        return (experts, n, k * codes.segb[s] // 8) if s < nseg else UNUSED

    nseg = len(codes.segb)
    if nseg not in (3, 4):
        raise MoecError(f"{storage_bits}-bit nested storage: the CUDA nested GEMV takes 3 or 4 segments, not {nseg}")
    Sc, Sz = (experts, n, groups), (experts, n, zbytes)

    # the widest signature (4 segments, the up stack), less what this variant does not take (kernels/signature.py)
    @T.prim_func
    def gemv(x: T.Buffer((xr, k), "float32"), seg0: T.Buffer(seg_shape(0), "uint8"),
             seg1: T.Buffer(seg_shape(1), "uint8"), seg2: T.Buffer(seg_shape(2), "uint8"),
             seg3: T.Buffer(seg_shape(3), "uint8"), scale: T.Buffer(Sc, "float16"), zero: T.Buffer(Sz, "uint8"),
             useg0: T.Buffer(seg_shape(0), "uint8"), useg1: T.Buffer(seg_shape(1), "uint8"),
             useg2: T.Buffer(seg_shape(2), "uint8"), useg3: T.Buffer(seg_shape(3), "uint8"),
             uscale: T.Buffer(Sc, "float16"), uzero: T.Buffer(Sz, "uint8"), prec: T.Buffer((experts,), "int32"),
             ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True})
        kernel(x, [seg0, seg1, seg2, seg3][:nseg] + ([useg0, useg1, useg2, useg3][:nseg] if swiglu else []),
               [scale, uscale] if swiglu else [scale], [zero, uzero] if swiglu else [zero], prec, ids, y)

    up = segment_names(nseg, prefix="useg") if swiglu else segment_names(0, prefix="useg") + ["uscale", "uzero"]
    return drop_params(gemv, segment_names(nseg) + up)


@functools.lru_cache(maxsize=None)
def cuda_fixed_gemv(bits: int, n: int, k: int, experts: int, top_k: int, group: int, xr: int,
                    vector: int | None = None, rows: int = 4, per_warp: int | None = None, magic: bool = False,
                    swiglu: bool = False, bind: bool = True, activations: str = "float32",
                    tiles: int | None = None, run_layout: bool = False) -> tirx.PrimFunc:
    """``gemv(x [xr, k], packed [E, n, k·bits/8], scale, zero, ids [top_k], y [top_k, n])`` over a fixed-width
    stack (ids all valid): the nested kernel's body for a single segment of ``bits`` (``activations``: as
    :func:`cuda_nested_gemv`; ``run_layout``: 3-bit codes in ``kernels/cuda_layout.py``'s layout, int8 only). ``swiglu``:
    ``gemv(x, packed, scale, zero, up_packed, up_scale, up_zero, ids, y)``, ``y = silu(gate x) · (up x)``."""
    codes = fixed_codes(bits)
    if vector is None:
        table = cuda_gemv_int8.FIXED_VECTOR if activations == "int8" else FIXED_VECTOR
        vector = _vector(codes, k, group, activations, (table[bits], 16, 8), table[bits])
    kernel = _make_kernel(codes, n, k, top_k, group, xr, vector, rows, per_warp, magic, False, bind, swiglu,
                          activations, run_layout, tiles)
    zbytes = packed_row_bytes(k // group, bits)
    Sp, Sc, Sz = (experts, n, k * bits // 8), (experts, n, k // group), (experts, n, zbytes)
    name = "expert_dequant_swiglu" if swiglu else "expert_dequant_gemv"

    @T.prim_func
    def gemv(x: T.Buffer((xr, k), "float32"), packed: T.Buffer(Sp, "uint8"), scale: T.Buffer(Sc, "float16"),
             zero: T.Buffer(Sz, "uint8"), upacked: T.Buffer(Sp, "uint8"), uscale: T.Buffer(Sc, "float16"),
             uzero: T.Buffer(Sz, "uint8"), ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True})
        kernel(x, [packed, upacked] if swiglu else [packed], [scale, uscale] if swiglu else [scale],
               [zero, uzero] if swiglu else [zero], None, ids, y)

    return drop_params(gemv, [] if swiglu else ["upacked", "uscale", "uzero"])
