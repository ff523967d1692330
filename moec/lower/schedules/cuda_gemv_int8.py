"""CUDA decode GEMVs with int8 activations: four weights an integer ``dp4a``, codes never converted one by one.

The float32 bodies of :mod:`cuda_gemv` turn every code into a float32 and multiply-add it: about four
instructions a weight at any width, so from 4 bits down (and for every nested width, which first assembles
its codes from bit planes) the kernel issues more than the memory delivers. These bodies take the same
stacks, blocks, rows a warp and per-width branch, and change what a lane does with its run of ``vector``
weights:

- **the block quantizes its activation row once**, into shared memory, as moec's CPU int8 kernels do
  (``kernels/activations.py``: per quantization group ``sx = max|x| / 127``, ``x8 = round(x / sx)``; a
  run's lanes of one group agree on its maximum by warp shuffles; the rounding is one fused multiply-add
  with 1.5·2**23, whose low byte is the code), four codes a 32-bit word in the order the code words below
  come out of their segments, with each run's ``sx`` and ``Σ x8``; up to 4 row tiles of the block share it
  (:func:`block_tiles`);
- **a row's run is a few 32-bit words of codes, one byte a code** (:func:`_layout`): natural order at 8
  bits; 2-bit codes by ``(w >> 2j) & 0x03030303`` (every fourth code of a word); 3-bit codes from the
  run layout (a 2-bit and a 1-bit part) where read in runs of 32, else by two multiplies per four
  (:func:`_spread3`); 4-bit codes as even/odd words; a nested stack in the run layout
  (``kernels/cuda_layout.py``, where the GPU emitter stores the stacks read in runs of 32) by one shift and
  one mask-or per segment a word, in moec's layout as even/odd words (``cuda_codes.spread``: each segment
  spread to its bits of the same bytes, shifted to the width's units);
- **one** ``dp4a`` **per word** (signed bytes: 8-bit codes less 128, by one xor a word; int32 sums), and the
  group's affine terms once per run: ``Σ w x = scale · 2**t · sx · (Σ q x8 − z' Σ x8)``, ``z'`` the bin-centred
  zero of the width (``cuda_gemv``'s rule; ``t = 0`` for a fixed stack; less 128 with the codes at 8 bits).

Results match ``dequantize(W) @ dequantized_activations(x)`` (the int8 CPU kernels' numerics), not the
float32 GEMV. ``bind=False`` gives the same bodies as serial loops with an integer ``dp4a`` written out,
so the CPU checks the numerics.
"""

from __future__ import annotations

from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.cuda_layout import RUN
from moec.lower.schedules.cuda_codes import LANES, Codes, code_bits, fixed_codes, nested_codes, row_outputs, spread

#: k per lane step by fixed width (where the shape takes it, else 16 or 8): runs of 32 issued 30–58 % fewer
#: instructions a weight than runs of 16 and 8 (sm_90 SASS, ``benchmarks/cuda_sass.py``), 3 bits needs 32.
FIXED_VECTOR = {2: 32, 3: 32, 4: 32, 8: 32}
#: k per lane step of a nested stack: its 1-bit planes a 32-bit word a run (``kernels/cuda_layout.RUN``).
NESTED_VECTOR = RUN
ROUND = 12582912.0  # 1.5 · 2**23: a float32 below 2**22 in magnitude plus this rounds to an integer (to even),
#                    whose bits less ROUND's are that integer, its low byte included


def dp4a(a, b, c, bind: bool):
    """``c + Σ_m sbyte_m(a) · sbyte_m(b)`` of int32 words of four signed bytes (CUDA's ``__dp4a``)."""
    if bind:
        return T.call_pure_extern("int32", "__dp4a", a, b, c)

    def sbyte(w, m):  # byte m of w as a signed value
        return (((w >> (8 * m)) & 0xFF) ^ 0x80) - 0x80

    for m in range(4):
        c = c + sbyte(a, m) * sbyte(b, m)
    return c


def _spread3(w):
    """Four 3-bit values (bits 0–11 of ``w``; bits above are ignored) to the low bits of four bytes, in order:
    values 0 and 2 by one multiply (bit 0 stays, bit 6 moves to 16), 1 and 3 by another (3 to 8, 9 to 24); each
    product's four terms lie in disjoint bits, so no carry reaches a kept one."""
    even = ((w & T.uint32(0x1C7)) * T.uint32(0x401)) & T.uint32(0x00070007)
    return even | (((w & T.uint32(0xE38)) * T.uint32(0x8020)) & T.uint32(0x07000700))


def _shifted(word, at: int, to: int):
    """``word`` with its bit ``at`` moved to bit ``to``."""
    if at == to:
        return word
    return word >> T.uint32(at - to) if at > to else word << T.uint32(to - at)


def _layout(codes: Codes, vector: int, run_layout: bool = False):
    """``(order, words)``: ``order(4 i + m)`` is the run element whose code is byte ``m`` of code word ``i`` (an
    int or a TIR index); ``words(bits_at, d)`` the ``vector // 4`` code words of a row's run at width index ``d``, from
    ``bits_at(s, offset, nbits)`` (``nbits`` bits of segment ``s``'s run at bit ``offset``). ``run_layout``: the
    nested segments, or a fixed stack's 3-bit codes, are in ``kernels/cuda_layout.py``'s layout (runs of 32)."""
    segb = codes.segb
    if run_layout and segb == (3,):  # a fixed 3-bit stack: two words of high parts, one of low bits
        def threes_runs(bits_at, d):
            out = []
            for i in range(vector // 4):
                high = _shifted(bits_at(0, 32 * (i // 4), 32), 2 * (i % 4), 1) & T.uint32(0x06060606)
                out.append(high | (_shifted(bits_at(0, 64, 32), i, 0) & T.uint32(0x01010101)))
            return out
        return (lambda slot: slot), threes_runs
    if run_layout:
        def runs(bits_at, d):
            t = codes.storage - codes.widths[d]
            out = []
            for i in range(vector // 4):
                word = None
                for s in range(codes.used[d]):
                    per, p = 8 // segb[s], codes.positions[s] - t  # parts a byte; the part's place in the code
                    part = _shifted(bits_at(s, 32 * (i // per), 32), segb[s] * (i % per), p)
                    part = part & T.uint32((((1 << segb[s]) - 1) * 0x01010101) << p)
                    word = part if word is None else word | part
                out.append(word)
            return out
        return (lambda slot: slot), runs
    if codes.used == (1,) and segb == (8,):
        return (lambda slot: slot), lambda bits_at, d: [bits_at(0, 32 * i, 32) for i in range(vector // 4)]
    if codes.used == (1,) and segb == (2,) and vector % 16 == 0:  # every fourth code of a 16-code word

        def stride4(bits_at, d):
            out = []
            for c in range(vector // 16):
                w = bits_at(0, 32 * c, 32)
                out += [(w >> T.uint32(2 * j)) & T.uint32(0x03030303) for j in range(4)]
            return out
        return (lambda slot: slot // 16 * 16 + slot // 4 % 4 + slot % 4 * 4), stride4
    if codes.used == (1,) and segb == (3,):
        def threes(bits_at, d):  # four codes a word: 12 bits, in one word or two
            return [_spread3(bits_at(0, 12 * i, 12, mask=False)) for i in range(vector // 4)]
        return (lambda slot: slot), threes
    # 4-bit fixed stacks and every nested width: even / odd words of each chunk of 8 (cuda_gemv.spread)

    def pairs(bits_at, d):
        t = codes.storage - codes.widths[d]
        out = []
        for c in range(vector // 8):
            lo = hi = None
            for s in range(codes.used[d]):
                a, b = spread(bits_at(s, 8 * segb[s] * c, 8 * segb[s]), segb[s], codes.positions[s] - t)
                lo, hi = (a, b) if lo is None else (lo | a, hi | b)
            out += [lo, hi]
        return out
    return (lambda slot: slot // 8 * 8 + slot // 4 % 2 + slot % 4 * 2), pairs


def _has_run_layout(codes: Codes) -> bool:
    """Whether ``kernels/cuda_layout.py`` lays out such a stack: nested ones, and fixed ones of 3-bit codes."""
    return len(codes.segb) > 1 or codes.segb == (3,)


def run_layout_fits(bits: int, n: int, k: int, group: int, rows: int = 4, nested: bool = True) -> bool:
    """Whether the int8 bodies read a stack of this shape in runs of :data:`RUN` from ``kernels/cuda_layout.py``'s
    layout (``nested``: a ``bits``-bit nested stack, else a fixed one), ``rows`` warps a block."""
    try:
        codes = nested_codes(bits) if nested else fixed_codes(bits)
        check_int8(codes, k, group, RUN)
    except MoecError:
        return False
    return _has_run_layout(codes) and n % rows == 0


def check_int8(codes: Codes, k: int, group: int, vector: int) -> None:
    runs = group // vector if vector and group % vector == 0 else 0
    if vector % 8 or k % (LANES * vector) or not runs or LANES % runs or (vector * min(codes.segb)) % 8:
        raise MoecError(f"cuda int8 GEMV: k={k}, group={group} do not fit runs of {vector} on {LANES} lanes")


def block_tiles(blocks: int, spans: int, most: int = 4, keep: int = 1024) -> int:
    """Row tiles a block serves from one quantized activation row: the most of ``most``, ``most / 2`` … 1 that
    divides the ``spans`` of a routed row and leaves at least ``keep`` blocks of the ``blocks`` (so a
    large GPU stays full; a GEMV with fewer blocks quantizes once a tile)."""
    t = most
    while t > 1 and (spans % t or blocks // t < keep):
        t //= 2
    return t


def kernel_int8(codes: Codes, n: int, k: int, top_k: int, group: int, xr: int, vector: int, rows: int,
                per_warp: int, bind: bool, swiglu: bool = False, run_layout: bool = False, tiles: int | None = None):
    """The macro ``kernel(x, segs, scales, zeros, prec or None, ids, y)`` (``cuda_gemv._kernel``'s signature)."""
    segb, widths, nseg = codes.segb, codes.widths, len(codes.segb)
    steps = k // (LANES * vector)
    runs = k // vector
    nw = vector // 4  # code words (and activation words) a run
    run = [vector * b // 8 for b in segb]  # bytes of each segment a run
    nwr = [(r + 3) // 4 for r in run]  # 32-bit words of each segment a run
    span = rows * per_warp
    tiles = tiles or block_tiles(top_k * (n // span), n // span)
    per = n // (span * tiles)  # blocks a routed row
    blocks = top_k * per
    R = per_warp
    H = 2 if swiglu else 1
    HR = H * R
    lanes_group = group // vector  # lanes (runs) of one quantization group
    if run_layout and (vector != RUN or not _has_run_layout(codes)):
        raise MoecError(f"the CUDA run layout is for nested stacks and fixed 3-bit ones read in runs of {RUN}, "
                        f"not {codes.segb[0] if len(codes.segb) == 1 else 'nested'}-bit ones in runs of {vector}")
    order, make_words = _layout(codes, vector, run_layout)

    def xrow(j):
        return j if xr > 1 else 0

    def zero_code(zero, e, row, g):
        return T.Cast("float32", code_bits(lambda i: zero[e, row, i], g * codes.storage, codes.storage,
                                            int(zero.shape[-1]) - 1))

    def word_view(seg, s):
        return T.decl_buffer((int(seg.shape[0]), n, k * segb[s] // 32), "uint32", data=seg.data)

    @T.macro
    def load_words(seg, sw, e, row, slot, s, base):
        if run[s] % 4 == 0:  # one vector load of whole words
            view = word_view(seg, s)
            for i in T.vectorized(nwr[s]):
                sw[slot * nseg + s, i] = view[e, row, base * nwr[s] + i]
        else:
            for i in T.unroll(nwr[s]):
                sw[slot * nseg + s, i] = T.uint32(0)
            for j in T.unroll(run[s]):  # byte by byte (runs of 1, 2, 3 or 6 bytes)
                sw[slot * nseg + s, j // 4] = sw[slot * nseg + s, j // 4] | (
                    T.Cast("uint32", seg[e, row, base * run[s] + j]) << T.Cast("uint32", 8 * (j % 4)))

    def make_body(d: int):
        used = codes.used[d]
        t = codes.storage - widths[d]
        unit = float(1 << t)
        recentre = 128 if widths[d] == 8 else 0  # dp4a multiplies signed bytes: 8-bit codes as q - 128
        centre = (unit - 1.0) / 2.0 + recentre

        def bits_at(sw, slot):
            def at(s, off, nbits, mask=True):
                i, o = off // 32, off % 32
                w = sw[slot * nseg + s, i]
                if o:
                    w = w >> T.uint32(o)
                if o + nbits > 32:
                    w = w | (sw[slot * nseg + s, i + 1] << T.uint32(32 - o))
                if mask and nbits < 32 and o + nbits != 32:  # bits above the value (this word's, or the next's)
                    w = w & T.uint32((1 << nbits) - 1)
                return w
            return at

        def row_dot(sw, xw, slot):
            """The int32 dot of a row's run: one ``dp4a`` a code word, chained (8-bit codes less 128, signed)."""
            total = T.int32(0)
            for i, word in enumerate(make_words(bits_at(sw, slot), d)):
                if recentre:
                    word = word ^ T.uint32(0x80808080)
                total = dp4a(T.reinterpret("int32", word), xw[i], total, bind)
            return total

        def run_sum(scale, zero, dot, e, row, g, sx, xs):
            """A run's share of a row: ``scale · 2**t · sx · (dot − z' Σ x8)``."""
            zq = (zero_code(zero, e, row, g) - T.float32(centre)) * T.float32(1.0 / unit)
            return T.Cast("float32", scale[e, row, g]) * T.float32(unit) * sx * (T.Cast("float32", dot) - zq * xs)

        @T.macro
        def load_stack(segs, sw, e, row0, h, base):
            for r in T.unroll(R):
                load_words(segs[h * nseg], sw, e, row0 + r, h * R + r, 0, base)
                if used > 1:
                    load_words(segs[h * nseg + 1], sw, e, row0 + r, h * R + r, 1, base)
                if used > 2:
                    load_words(segs[h * nseg + 2], sw, e, row0 + r, h * R + r, 2, base)
                if used > 3:
                    load_words(segs[h * nseg + 3], sw, e, row0 + r, h * R + r, 3, base)

        @T.macro
        def dot_stack(scales, zeros, acc, xw, sw, dots, e, row0, h, g, sx, xs):
            for r in T.unroll(R):
                dots[0] = row_dot(sw, xw, h * R + r)
                acc[h * R + r] = acc[h * R + r] + run_sum(scales[h], zeros[h], dots[0], e, row0 + r, g, sx, xs)

        @T.macro
        def body(segs, scales, zeros, acc, xq, xf, xw, sw, dots, e, row0, lane):
            for ko in range(steps):
                for i in T.vectorized(nw):
                    xw[i] = xq[(ko * LANES + lane) * nw + i]
                load_stack(segs, sw, e, row0, 0, ko * LANES + lane)
                if H == 2:
                    load_stack(segs, sw, e, row0, 1, ko * LANES + lane)
                dot_stack(scales, zeros, acc, xw, sw, dots, e, row0, 0, (ko * LANES + lane) * vector // group,
                          xf[2 * (ko * LANES + lane)], xf[2 * (ko * LANES + lane) + 1])
                if H == 2:
                    dot_stack(scales, zeros, acc, xw, sw, dots, e, row0, 1, (ko * LANES + lane) * vector // group,
                              xf[2 * (ko * LANES + lane)], xf[2 * (ko * LANES + lane) + 1])
        return body

    bodies = [make_body(d) for d in range(len(widths))]
    nwd = len(widths)

    def pack(q, i):
        w = T.Cast("uint32", q[order(4 * i)]) & T.uint32(0xFF)
        for m in range(1, 4):
            w = w | ((T.Cast("uint32", q[order(4 * i + m)]) & T.uint32(0xFF)) << T.uint32(8 * m))
        return T.reinterpret("int32", w)

    @T.macro
    def quantize_run(x, row, r, xq, xf, xl, q, amax, lane):
        """Run ``r`` of row ``row`` of ``x`` to int8 words ``xq`` (in ``order``), its ``sx`` and ``Σ x8`` in ``xf``."""
        for c in range(vector // 4):
            for i in T.vectorized(4):
                xl[c * 4 + i] = x[row, r * vector + c * 4 + i]
        amax[0] = T.float32(0)
        if bind:
            for v in T.unroll(vector):
                amax[0] = T.max(amax[0], T.abs(xl[v]))
            for o in T.unroll(lanes_group.bit_length() - 1):  # the group's lanes agree on its maximum
                amax[0] = T.max(amax[0], T.tvm_warp_shuffle(
                    T.tvm_warp_activemask(), amax[0], lane ^ (1 << o), LANES, LANES))
        else:
            for v in range(group):
                amax[0] = T.max(amax[0], T.abs(x[row, r * vector // group * group + v]))
        amax[0] = T.max(amax[0], T.float32(1e-30))
        amax[1] = T.float32(127) / amax[0]
        for v in T.unroll(vector):  # round(x / sx) as the bits of x · 127/max + 1.5 · 2**23: its low byte is the code
            q[v] = T.reinterpret("int32", xl[v] * amax[1] + T.float32(ROUND))
        q[vector] = 0
        for i in T.unroll(nw):  # each word stored, and its codes summed by one dp4a with ones
            q[vector + 1] = pack(q, i)
            xq[r * nw + i] = q[vector + 1]
            q[vector] = dp4a(q[vector + 1], T.int32(0x01010101), q[vector], bind)
        xf[2 * r] = amax[0] / T.float32(127)
        xf[2 * r + 1] = T.Cast("float32", q[vector])

    @T.macro
    def lane_sum(segs, scales, zeros, prec, ids, acc, xq, xf, xw, sw, dots, j, row0, lane):
        for r in T.unroll(HR):
            acc[r] = T.float32(0)
        if nwd == 1:
            bodies[0](segs, scales, zeros, acc, xq, xf, xw, sw, dots, ids[j], row0, lane)
        elif prec[ids[j]] == widths[0]:
            bodies[0](segs, scales, zeros, acc, xq, xf, xw, sw, dots, ids[j], row0, lane)
        elif prec[ids[j]] == widths[1]:
            bodies[1](segs, scales, zeros, acc, xq, xf, xw, sw, dots, ids[j], row0, lane)
        elif nwd == 4 and prec[ids[j]] == widths[2]:
            bodies[2](segs, scales, zeros, acc, xq, xf, xw, sw, dots, ids[j], row0, lane)
        else:  # the widest (the session refuses widths the format does not serve)
            bodies[-1](segs, scales, zeros, acc, xq, xf, xw, sw, dots, ids[j], row0, lane)

    result, store = row_outputs(R, H)

    threads = rows * LANES
    passes = (runs + threads - 1) // threads

    @T.macro
    def bound(x, segs, scales, zeros, prec, ids, y):
        for b in T.thread_binding(blocks, thread="blockIdx.x"):
            for w in T.thread_binding(rows, thread="threadIdx.y"):
                for lane in T.thread_binding(LANES, thread="threadIdx.x"):
                    xq = T.alloc_buffer((runs * nw,), "int32", scope="shared")
                    xf = T.alloc_buffer((2 * runs,), "float32", scope="shared")
                    xl = T.alloc_buffer((vector,), "float32", scope="local")
                    q = T.alloc_buffer((vector + 2,), "int32", scope="local")
                    amax = T.alloc_buffer((2,), "float32", scope="local")
                    for p in range(passes):  # runs % 32 == 0: a warp's lanes all take a run or none
                        if p * threads + w * LANES + lane < runs:
                            quantize_run(x, xrow(b // per), p * threads + w * LANES + lane, xq, xf, xl, q, amax,
                                         lane)
                    T.tvm_storage_sync("shared")
                    acc = T.alloc_buffer((HR,), "float32", scope="local")
                    xw = T.alloc_buffer((nw,), "int32", scope="local")
                    sw = T.alloc_buffer((HR * nseg, max(nwr)), "uint32", scope="local")
                    dots = T.alloc_buffer((1,), "int32", scope="local")
                    for tt in range(tiles):  # the block's row tiles, one quantized activation row
                        lane_sum(segs, scales, zeros, prec, ids, acc, xq, xf, xw, sw, dots, b // per,
                                 (b % per * tiles + tt) * span + w * R, lane)
                        store(acc, y, b // per, (b % per * tiles + tt) * span + w * R, lane)

    @T.macro
    def serial(x, segs, scales, zeros, prec, ids, y):
        for b in range(blocks):
            xq = T.alloc_buffer((runs * nw,), "int32")
            xf = T.alloc_buffer((2 * runs,), "float32")
            xl = T.alloc_buffer((vector,), "float32")
            q = T.alloc_buffer((vector + 2,), "int32")
            amax = T.alloc_buffer((2,), "float32")
            for r in range(runs):
                quantize_run(x, xrow(b // per), r, xq, xf, xl, q, amax, 0)
            for tt, w in T.grid(tiles, rows):
                part = T.alloc_buffer((HR,), "float32")
                for r in range(HR):
                    part[r] = T.float32(0)
                for lane in range(LANES):
                    acc = T.alloc_buffer((HR,), "float32")
                    xw = T.alloc_buffer((nw,), "int32")
                    sw = T.alloc_buffer((HR * nseg, max(nwr)), "uint32")
                    dots = T.alloc_buffer((1,), "int32")
                    lane_sum(segs, scales, zeros, prec, ids, acc, xq, xf, xw, sw, dots, b // per,
                             (b % per * tiles + tt) * span + w * R, lane)
                    for r in range(HR):
                        part[r] = part[r] + acc[r]
                for r in range(R):
                    y[b // per, (b % per * tiles + tt) * span + w * R + r] = result(part, r)

    return bound if bind else serial

