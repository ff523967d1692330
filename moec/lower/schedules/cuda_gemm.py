"""CUDA prefill grouped GEMM, hand-written TIR with threads bound: rows sorted by expert, each expert's weights
read once per tile of its tokens (not once per token, as decode steps do).

``gemm(x [P, K], <stack>, offsets [E + 1], y [P, N])``: rows ``offsets[e] .. offsets[e + 1]`` of ``x`` times
expert ``e``. One thread block of ``THREADS`` threads per (expert, tile of ``BN`` output rows: 64, or 32 where
``n`` is not a multiple of 64); a block whose expert has no rows returns at once. It takes its expert's rows
``BT`` at a time; per step of ``BK`` k (32, or 16; inside one quantization group) it

- dequantizes the ``[BN, BK]`` weight tile into shared memory (``BN · BK / THREADS`` weights a thread, one
  row's consecutive codes: a fixed stack's ``(q − zero) · scale``; a nested stack's code assembled from the
  segments its expert's run-time width ``prec[e]`` reads, ``(q_t − zero + (2**t − 1) / 2) · scale`` as in
  ``moec.quant.nested``, the other segments never read; a float stack's values converted),
- copies the ``[BT, BK]`` activation tile into shared memory (rows past the expert's last repeat it:
  their outputs are never stored),
- and each thread adds a ``TN × TT`` block of outputs (``TN`` = 4 rows × ``TT`` tokens, 4 on 64-row tiles) from
  the two tiles.

``dense``: one stack of one matrix and no ``offsets``, every row of ``x`` (a prefill's dense projections).
``bind=False``: the same phases as serial loops over blocks and threads (each phase over every thread before
the next, where the GPU has a barrier), so the CPU can check the numerics; ``tests/lower/cuda_host.py`` runs
the bound form's CUDA C.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.cuda_layout import RUN
from moec.lower.kernels.signature import UNUSED, drop_params, segment_names
from moec.lower.schedules.cuda_codes import Codes, code_bits, fixed_codes, nested_codes
from moec.quant.pack import packed_row_bytes

THREADS = 128
BT, TN = 32, 4  # tokens of a block's tile; output rows a thread
TILE_ROWS, TILE_K = (64, 32), (32, 16)  # output rows and k of a block's tile, the first the shape takes


def tile_shape(n: int, k: int, group: int | None) -> tuple[int, int]:
    """(output rows, k) of the block tile for this shape: ``n`` a multiple of the rows, ``k`` and the quantization
    group (None: float weights) of the k; a one-line error where none fits."""
    bn = next((b for b in TILE_ROWS if n % b == 0), None)
    bk = next((b for b in TILE_K if k % b == 0 and (group is None or group % b == 0)), None)
    if bn is None or bk is None:
        rows, ks = "/".join(map(str, TILE_ROWS)), "/".join(map(str, TILE_K))
        raise MoecError(f"cuda grouped GEMM: n={n}, k={k}, group={group} do not fit tiles of {rows} rows and {ks} k "
                        "(groups a multiple of the k)")
    return bn, bk


def run_part(seg, e, row, kk, bits: int, run_bytes: int, offset: int = 0):
    """The ``bits``-bit part (1, 2 or 4) of code ``kk`` of a row stored in ``kernels/cuda_layout.py``'s run layout:
    code ``4 i + m`` of a run of 32 at byte ``4 (i // (8 / bits)) + m`` of the run's words (which start ``offset``
    bytes into the run's ``run_bytes``), bit ``bits · (i mod 8 / bits)``."""
    per = 8 // bits
    c = kk % RUN
    byte = kk // RUN * run_bytes + offset + 4 * (c // 4 // per) + c % 4
    return (T.Cast("uint32", seg[e, row, byte]) >> T.Cast("uint32", bits * (c // 4 % per))) & T.uint32(
        (1 << bits) - 1)


def _code(seg, e, row, kk, bits: int, run_layout: bool):
    """A segment's ``bits``-bit part of code ``kk``: moec's LSB-first layout, or the run layout (3 bits: the high two
    bits' words, then the low bit's word, 12 bytes a run)."""
    if not run_layout:
        return code_bits(lambda i: seg[e, row, i], kk * bits, bits, int(seg.shape[-1]) - 1)
    if bits == 3:
        return (run_part(seg, e, row, kk, 2, 12) << T.uint32(1)) | run_part(seg, e, row, kk, 1, 12, 8)
    return run_part(seg, e, row, kk, bits, RUN * bits // 8)


def _gemm(codes: Codes | None, n: int, k: int, group: int, experts: int, nested: bool, dense: bool, bind: bool,
          run_layout: bool = False):
    """The macro ``(x, segs, weight, scale, zero, prec, offsets, tokens, y)`` of the kernel (``codes`` None: float
    weights in ``weight``; ``run_layout``: the codes in ``kernels/cuda_layout.py``'s layout)."""
    BN, BK = tile_shape(n, k, group if codes else None)
    TT = BN * BT // (TN * THREADS)  # tokens a thread: BN / TN × BT / TT = THREADS
    W_RUN, X_RUN = BN * BK // THREADS, BT * BK // THREADS  # weights, activations a thread loads per step
    tiles = n // BN  # row tiles of an expert: blocks = experts × tiles
    blocks, steps = experts * tiles, k // BK
    per_row = BK // W_RUN  # threads sharing a weight row of the tile
    per_x = BK // X_RUN  # threads sharing an activation row of the tile
    rows_t = BN // TN  # threads along the output rows

    def weight_at(segs, weight, scale, zero, e, width, row, kk, g):
        """Float32 weight ``[row, kk]`` of expert ``e`` (nested: at ``width``)."""
        if codes is None:
            return T.Cast("float32", weight[e, row, kk])
        q = None
        for s, (b, pos) in enumerate(zip(codes.segb, codes.positions)):
            part = _code(segs[s], e, row, kk, b, run_layout)
            if pos:
                part = part << T.uint32(pos)
            if nested and s:
                part = T.if_then_else(width >= codes.widths[s], part, T.uint32(0))
            q = part if q is None else q | part
        z = T.Cast("float32", code_bits(lambda i: zero[e, row, i], g * codes.storage, codes.storage,
                                        int(zero.shape[-1]) - 1))
        if nested:  # the bin's centre of the truncated code: ((1 << t) - 1) / 2, t = storage - width
            z = z - T.Cast("float32", (T.int32(1) << (T.int32(codes.storage) - width)) - 1) * T.float32(0.5)
        return (T.Cast("float32", q) - z) * T.Cast("float32", scale[e, row, g])

    def first(offsets, b):
        """Block ``b``'s first row of ``x``."""
        return T.int32(0) if dense else offsets[b // tiles]

    def count_of(offsets, tokens, b):
        """Rows of block ``b``'s expert."""
        return tokens if dense else offsets[b // tiles + 1] - offsets[b // tiles]

    def width_of(prec, b):
        return prec[b // tiles] if nested else T.int32(0)

    @T.macro
    def load(x, segs, weight, scale, zero, ws, xs, e, width, start, count, tile, blk, kc, tid):
        for i in T.unroll(W_RUN):
            ws[tid % per_row * W_RUN + i, tid // per_row] = weight_at(
                segs, weight, scale, zero, e, width, tile * BN + tid // per_row, kc * BK + tid % per_row * W_RUN + i,
                kc * BK // group)
        for i in T.unroll(X_RUN):
            xs[tid // per_x, tid % per_x * X_RUN + i] = x[
                start + T.min(blk * BT + tid // per_x, count - 1), kc * BK + tid % per_x * X_RUN + i]

    @T.macro
    def accumulate(ws, xs, acc, slot, tid):
        for kk in range(BK):
            for t in T.unroll(TT):
                for r in T.unroll(TN):
                    acc[slot, t * TN + r] = acc[slot, t * TN + r] + xs[tid // rows_t * TT + t, kk] * ws[
                        kk, tid % rows_t * TN + r]

    @T.macro
    def store(y, acc, slot, start, count, tile, blk, tid):
        for t in T.unroll(TT):
            if blk * BT + tid // rows_t * TT + t < count:
                for r in T.unroll(TN):
                    y[start + blk * BT + tid // rows_t * TT + t, tile * BN + tid % rows_t * TN + r] = acc[
                        slot, t * TN + r]

    @T.macro
    def clear(acc, slot):
        for i in T.unroll(TT * TN):
            acc[slot, i] = T.float32(0)

    @T.macro
    def bound(x, segs, weight, scale, zero, prec, offsets, tokens, y):
        for b in T.thread_binding(blocks, thread="blockIdx.x"):
            for tid in T.thread_binding(THREADS, thread="threadIdx.x"):
                ws = T.alloc_buffer((BK, BN), "float32", scope="shared")
                xs = T.alloc_buffer((BT, BK), "float32", scope="shared")
                acc = T.alloc_buffer((1, TT * TN), "float32", scope="local")
                start: T.int32 = first(offsets, b)
                count: T.int32 = count_of(offsets, tokens, b)
                width: T.int32 = width_of(prec, b)
                for blk in range((count + BT - 1) // BT):
                    clear(acc, 0)
                    for kc in range(steps):
                        load(x, segs, weight, scale, zero, ws, xs, b // tiles, width, start, count, b % tiles, blk,
                             kc, tid)
                        T.tvm_storage_sync("shared")
                        accumulate(ws, xs, acc, 0, tid)
                        T.tvm_storage_sync("shared")
                    store(y, acc, 0, start, count, b % tiles, blk, tid)

    @T.macro
    def serial(x, segs, weight, scale, zero, prec, offsets, tokens, y):
        for b in range(blocks):
            ws = T.alloc_buffer((BK, BN), "float32")
            xs = T.alloc_buffer((BT, BK), "float32")
            acc = T.alloc_buffer((THREADS, TT * TN), "float32")
            start: T.int32 = first(offsets, b)
            count: T.int32 = count_of(offsets, tokens, b)
            width: T.int32 = width_of(prec, b)
            for blk in range((count + BT - 1) // BT):
                for tid in range(THREADS):
                    clear(acc, tid)
                for kc in range(steps):
                    for tid in range(THREADS):
                        load(x, segs, weight, scale, zero, ws, xs, b // tiles, width, start, count, b % tiles, blk,
                             kc, tid)
                    for tid in range(THREADS):
                        accumulate(ws, xs, acc, tid, tid)
                for tid in range(THREADS):
                    store(y, acc, tid, start, count, b % tiles, blk, tid)

    return bound if bind else serial


@functools.lru_cache(maxsize=None)  # one parse per shape: a model's layers share a few
def cuda_grouped_gemm(kind: str, bits: int, n: int, k: int, experts: int, group: int | None = None,
                      dense: bool = False, bind: bool = True, run_layout: bool = False) -> tirx.PrimFunc:
    """The grouped GEMM over one stack: ``kind`` ``fixed`` (``bits`` 2, 3, 4 or 8: ``packed, scale, zero``),
    ``nested`` (storage ``bits``: ``seg0…, scale, zero, prec``) or ``float`` (``bits`` 16 or 32: ``weight``):
    ``gemm(x, <stack>, offsets, y)``; ``dense``: ``gemm(x, <stack of one>, y)`` over every row. ``run_layout``:
    the segments (a nested stack) or 3-bit codes (a fixed one) in ``kernels/cuda_layout.py``'s layout, as the CUDA
    emitter stores them for int8 activations. A one-line :class:`MoecError` for a shape or width it does not take."""
    if kind not in ("fixed", "nested", "float"):
        raise MoecError(f"internal: grouped GEMM kind {kind!r}")
    quantized = kind != "float"
    if not quantized and bits not in (16, 32):
        raise MoecError(f"the CUDA grouped GEMM takes float16 or float32 weights, not {bits}-bit")
    codes = (nested_codes(bits) if kind == "nested" else fixed_codes(bits)) if quantized else None
    nseg = len(codes.segb) if kind == "nested" else 0
    if nseg > 4:
        raise MoecError(f"{bits}-bit nested storage: the CUDA grouped GEMM takes at most 4 segments, not {nseg}")
    if run_layout and (kind == "float" or (kind == "fixed" and bits != 3) or k % RUN):
        raise MoecError(f"the CUDA grouped GEMM reads the run layout for nested stacks and 3-bit codes of rows of a "
                        f"multiple of {RUN}, not {kind} {bits}-bit of {k}")
    macro = _gemm(codes, n, k, group if quantized else k, experts, kind == "nested", dense, bind, run_layout)
    groups = k // group if quantized else 1
    zbytes = packed_row_bytes(groups, bits) if quantized else 1

    def seg_shape(s):
        return (experts, n, k * codes.segb[s] // 8) if s < nseg else UNUSED

    Sp = (experts, n, k * bits // 8) if kind == "fixed" else UNUSED
    Sc, Sz = ((experts, n, groups), (experts, n, zbytes)) if quantized else (UNUSED, UNUSED)
    Sw, wdtype = ((experts, n, k) if not quantized else UNUSED), ("float16" if bits == 16 else "float32")
    name = f"cuda_{'dense' if dense else 'grouped'}_gemm"

    # the widest signature, less what this variant does not take (kernels/signature.py)
    @T.prim_func
    def gemm(x_h: T.handle, packed: T.Buffer(Sp, "uint8"), seg0: T.Buffer(seg_shape(0), "uint8"),
             seg1: T.Buffer(seg_shape(1), "uint8"), seg2: T.Buffer(seg_shape(2), "uint8"),
             seg3: T.Buffer(seg_shape(3), "uint8"), weight: T.Buffer(Sw, wdtype), scale: T.Buffer(Sc, "float16"),
             zero: T.Buffer(Sz, "uint8"), prec: T.Buffer((experts,), "int32"),
             offsets: T.Buffer((experts + 1,), "int32"), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True})
        tokens = T.int32()
        x = T.match_buffer(x_h, (tokens, k), "float32")
        y = T.match_buffer(y_h, (tokens, n), "float32")
        macro(x, [packed] if kind == "fixed" else [seg0, seg1, seg2, seg3][:nseg], weight, scale, zero, prec,
              offsets, tokens, y)

    drop = segment_names(nseg) + (["packed"] if kind != "fixed" else [])
    drop += ["weight"] if quantized else ["scale", "zero"]
    drop += [] if kind == "nested" else ["prec"]
    drop += ["offsets"] if dense else []
    return drop_params(gemm, drop)
