"""x86 AVX-512 VNNI decode GEMV over nested (any-precision) expert stacks, int8 activations.

The int8-activation counterpart of :mod:`moec.lower.kernels.nested_gemv`: same arguments (``x``
float32, ``seg{s}``, ``scale``, ``zero``, ``prec``, ``expert_ids``, ``y``), same layout
(:func:`moec.lower.kernels.layout.nested_kernel_layout`), ``x`` quantized per group as the fixed
VNNI GEMV quantizes it (:func:`moec.lower.kernels.activations.quantize_activations`). Explicit TIR
like :mod:`moec.lower.schedules.x86_vnni` (``tensorize`` crashes in this TVM).

Per parallel task (a routed row ``j`` and ``vecs`` vectors of 16 rows) the width ``k = prec[e]``
picks one loop nest, specialised for ``k`` at compile time, so the planes ``k`` skips are never
loaded. A step is one *nibble word* ``a`` of a group (8 codes per row, one per 4-bit lane,
``moec.lower.kernels.nested_layout``), rebuilt in registers from the needed segment words:

- ``k <= 4``: the needed segments are merged into the nibble word (a constant shift per segment,
  a bit select per further one: :func:`_nibbles`), each lane holding ``q_k << (4 − k)`` (bits below
  may be stale); ``word & M`` and ``word & (M << 4)`` (``M`` the width's bits in every byte) put
  lanes 0,2,4,6 and 1,3,5,7 one per byte (the odd ones in place in the high nibble: their chain sums
  16 × the products, shifted right by 4 once a group), and two ``vpdpbusd`` multiply them by 4 int8
  activations each;
- ``k = 8`` (8-bit storage): the top nibble word (segments 2+1+1) and the low segment's word are
  interleaved into two byte words of whole codes (two bit selects), then two ``vpdpbusd``.

So the integer sum ``D`` of a group is ``sum (q_k << (4 − k)) · x8`` (``k = 8``: ``sum q · x8``),
exact; the group term is, with ``s = B − k`` (``B`` the storage width) and the bin centre
``(2**s − 1) / 2`` of :mod:`moec.quant.nested`::

    scale · sx · (D·2**(B−4) − (zero − (2**s − 1)/2) · xsum)    (k = B: scale · sx · (D − zero · xsum))

evaluated as ``scale · sx · 0.5 · float(2·D·2**(B−4) − (2·zero − 2**s + 1) · xsum)`` in int32 (exact),
and for ``k = B`` exactly as the fixed VNNI kernel's group term, so the stored width is bit-identical
to a fixed bundle of the same codes.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from math import gcd

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.decode import code_at
from moec.lower.kernels.layout import num_tiles, zero_words
from moec.lower.kernels.scopes import stack_scope
from moec.lower.kernels.nested_gemv import NestedGemvSpec
from moec.lower.schedules.int8_common import claim, claim_lanes, lane_task, quantize_activations_prep, unclaimed
from moec.quant.nested import segment_positions

LANES = 16


def _splat(value: int, dtype: str = "uint32"):
    return T.Broadcast(tirx.const(value, dtype), LANES)


def _dpbusd(acc, codes, x4):
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                   T.reinterpret("int8x64", codes), x4)


def _select(a, b, mask: int):
    """``(a & mask) | (b & ~mask)``: one ``vpternlogd`` (``mask ? a : b`` bitwise, immediate 0xCA),
    called as the intrinsic so LLVM cannot push the byte masks after it through the selects into
    per-part masks (which doubled the 8-bit step's instructions)."""
    out = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.pternlog.d.512",
                                  T.reinterpret("int32x16", _splat(mask)), T.reinterpret("int32x16", a),
                                  T.reinterpret("int32x16", b), T.int32(0xCA))
    return T.reinterpret("uint32x16", out)


def _shift(raw, shift: int):
    return raw << _splat(shift) if shift > 0 else (raw >> _splat(-shift) if shift < 0 else raw)


def slot_source(slot: int) -> int:
    """Within 32 codes (4 nibble words), the code whose activation is at slot ``slot`` of ``x8``.

    Slots ``8a' .. 8a'+3`` are nibble word ``a'``'s even lanes 0,2,4,6 (the first ``vpdpbusd``),
    ``8a'+4 .. 8a'+7`` its odd lanes 1,3,5,7; lane ``l`` of nibble word ``a'`` is code ``4l + a'``.
    """
    a, c = slot // 8, slot % 8  # ints or TIR expressions (the prep's unrolled slot loop)
    return 4 * (2 * (c % 4) + c // 4) + a


def _nibbles(fmt, load, a: int, segments, offset: int):
    """Nibble word ``a`` (constant within its 4-word chunk) from ``segments``: each part shifted to
    bit ``pos_s − offset`` of its lane, merged by bit selects, most significant last (bits below
    the lowest segment's may be stale). ``load(s, word)`` is the segment's word of the chunk."""
    positions = segment_positions(fmt)
    word = None
    for s in reversed(list(segments)):
        width = fmt.segment_bits[s]
        per = 4 // width
        raw = load(s, a // per)
        part = _shift(raw, (positions[s] - offset) - width * (a % per))
        if word is None:
            word = part
        else:
            keep = (((1 << width) - 1) * 0x11111111 << (positions[s] - offset)) & 0xFFFFFFFF
            word = _select(part, word, keep)
    return word


def _byte_words(fmt, d: int, load, a: int):
    """(even, odd) uint32x16 words of nibble word ``a`` at derived width ``d``: one code per byte."""
    k, bits = fmt.derived_bits[d], fmt.storage_bits
    if k <= 4:
        word = _nibbles(fmt, load, a, range(d + 1), bits - 4)
        mask = (((1 << k) - 1) << (4 - k)) * 0x01010101
        # odd lanes masked in place (the high nibble of each byte, at most 0xF0: still an unsigned byte),
        # so their chain sums 16 × their products and needs no shift (:func:`_group_dot`)
        return word & _splat(mask), word & _splat(mask << 4)
    positions = segment_positions(fmt)
    high = [s for s in range(d + 1) if positions[s] >= 4]
    low = [s for s in range(d + 1) if positions[s] < 4]
    if len(low) != 1 or fmt.segment_bits[low[0]] != 4 or positions[low[0]] != 0:
        raise MoecError(f"{fmt.name}: the int8 nested kernel needs one 4-bit low segment for 8 bits")
    top = _nibbles(fmt, load, a, high, 4)
    bottom = load(low[0], a)
    even = _select(top << _splat(4), bottom, 0xF0F0F0F0)
    odd = _select(top, bottom >> _splat(4), 0xF0F0F0F0)
    return even, odd


def check_int8_nested(spec: NestedGemvSpec, tile_vectors: int) -> None:
    """One-line refusal of a shape this kernel cannot take."""
    if spec.tile % LANES or spec.n % LANES:
        raise MoecError(f"the int8 nested GEMV needs N ({spec.n}) and the layout tile ({spec.tile}) to be "
                        f"multiples of {LANES}")
    if spec.group_size % 32:
        raise MoecError(f"the int8 nested GEMV needs group_size ({spec.group_size}) a multiple of 32")
    if tile_vectors < 1:
        raise MoecError(f"bad tile_vectors {tile_vectors}")


def vnni_nested_gemv(spec: NestedGemvSpec, params) -> tirx.PrimFunc:
    """The int8-activation nested GEMV for ``spec``; ``params`` an
    :class:`~moec.lower.schedules.x86.X86Params` (``int8_nested_tile_vectors``)."""
    fmt, bits = spec.format, spec.storage_bits
    vecs = params.int8_nested_tile_vectors
    check_int8_nested(spec, vecs)
    n, k, gs, tile, top_k, experts = spec.n, spec.k, spec.group_size, spec.tile, spec.top_k, spec.num_stacked
    groups, nb = k // gs, n // LANES
    tiles = -(-nb // vecs)
    chunks = gs // 32  # 4 nibble words (32 codes) per chunk
    xr = top_k if spec.x_per_expert else 1
    xstride = 1 if spec.x_per_expert else 0
    nt, zw = num_tiles(n, tile), zero_words(groups, bits)
    prep = quantize_activations_prep(xr, k, gs, gcd(gs, LANES), 32, slot_source)
    widths = fmt.derived_bits
    ntask = top_k * tiles
    task_lanes = claim_lanes(ntask, params.int8_claim_lanes)  # 0: TVM's static split
    claim_words = -(-ntask // 32)
    nseg = len(fmt.segment_bits)

    def group_dot(even, odd, d):
        """The group's ``D`` from the two chains: up to 4 bits the odd chain holds 16 × its products
        (multiples of 16: the shift is exact)."""
        return even + (odd >> 4) if widths[d] <= 4 else even + odd

    def group_term(dot, scale, zero, sx, xsum, e, gv, g, lane, r, d):
        t, col = gv * LANES // tile, gv * LANES % tile + lane
        zq = T.Cast("int32", code_at(lambda word: zero[e, t, word, col], g, bits))
        s = T.Cast("float32", scale[e, t, g, col]) * sx[r, g]
        shift = bits - widths[d]
        if shift == 0:  # the stored width: the fixed VNNI kernel's group term exactly
            return s * T.Cast("float32", dot - zq * xsum[r, g])
        full = dot * (1 << (bits - 4)) if widths[d] <= 4 else dot
        twice = full * 2 - (zq * 2 - ((1 << shift) - 1)) * xsum[r, g]
        return s * T.float32(0.5) * T.Cast("float32", twice)

    def make_nest(d):
        seg_words = [gs * w // 32 for w in fmt.segment_bits]  # words per group, per segment

        def step(segs, x8, acc, e, gv, g, ch, r, a: int, half: int):
            """Chain ``half`` (0: even lanes, 1: odd) of the accumulator (int32x16) after nibble word
            ``a`` of chunk ``ch`` of group ``g``. The two chains of a word are consecutive statements
            (the same rebuild expression, which LLVM computes once): a chain per word, not per chunk,
            keeps one word's temporaries live at a time (chunk-long chains spilled 260-590 vectors)."""
            def load(s, word):  # word of segment s within this chunk
                per_chunk = seg_words[s] // chunks
                return segs[s][e, gv * LANES // tile, g * seg_words[s] + ch * per_chunk + word,
                               T.ramp(gv * LANES % tile, 1, LANES)]
            codes = _byte_words(fmt, d, load, a)[half]
            x4 = T.reinterpret("int8x64", T.Broadcast(
                T.reinterpret("int32", x8[r, T.ramp(g * gs + ch * 32 + 8 * a + 4 * half, 1, 4)]), LANES))
            return _dpbusd(acc, codes, x4)

        @T.macro
        def nest(segs, scale, zero, sx, xsum, x8, yacc, acc, e, task, r):
            # (the vector index is spelled out in each statement: naming it with a let variable made
            # LLVM spill 13-38 vectors a chunk instead of 4-13)
            for g in range(groups):
                for a in T.unroll(2 * vecs):
                    for lane in T.vectorized(LANES):
                        acc[a, lane] = 0
                for ch in range(chunks):
                    for v in T.unroll(vecs):
                        if task // top_k * vecs + v < nb:
                            acc[2 * v + 0, T.ramp(0, 1, LANES)] = step(
                                segs, x8, acc[2 * v + 0, T.ramp(0, 1, LANES)], e, task // top_k * vecs + v, g, ch, r, 0, 0)
                            acc[2 * v + 1, T.ramp(0, 1, LANES)] = step(
                                segs, x8, acc[2 * v + 1, T.ramp(0, 1, LANES)], e, task // top_k * vecs + v, g, ch, r, 0, 1)
                            acc[2 * v + 0, T.ramp(0, 1, LANES)] = step(
                                segs, x8, acc[2 * v + 0, T.ramp(0, 1, LANES)], e, task // top_k * vecs + v, g, ch, r, 1, 0)
                            acc[2 * v + 1, T.ramp(0, 1, LANES)] = step(
                                segs, x8, acc[2 * v + 1, T.ramp(0, 1, LANES)], e, task // top_k * vecs + v, g, ch, r, 1, 1)
                            acc[2 * v + 0, T.ramp(0, 1, LANES)] = step(
                                segs, x8, acc[2 * v + 0, T.ramp(0, 1, LANES)], e, task // top_k * vecs + v, g, ch, r, 2, 0)
                            acc[2 * v + 1, T.ramp(0, 1, LANES)] = step(
                                segs, x8, acc[2 * v + 1, T.ramp(0, 1, LANES)], e, task // top_k * vecs + v, g, ch, r, 2, 1)
                            acc[2 * v + 0, T.ramp(0, 1, LANES)] = step(
                                segs, x8, acc[2 * v + 0, T.ramp(0, 1, LANES)], e, task // top_k * vecs + v, g, ch, r, 3, 0)
                            acc[2 * v + 1, T.ramp(0, 1, LANES)] = step(
                                segs, x8, acc[2 * v + 1, T.ramp(0, 1, LANES)], e, task // top_k * vecs + v, g, ch, r, 3, 1)
                for v in T.unroll(vecs):
                    if task // top_k * vecs + v < nb:
                        for lane in T.vectorized(LANES):
                            yacc[v, lane] = yacc[v, lane] + group_term(
                                group_dot(acc[2 * v, lane], acc[2 * v + 1, lane], d), scale, zero, sx, xsum, e,
                                task // top_k * vecs + v, g, lane, r, d)

        return nest

    nests = [make_nest(d) for d in range(len(widths))]
    four = len(widths) == 4  # else three widths: the third test is left out (a Python-level False)
    if len(widths) not in (3, 4):
        raise MoecError(f"{fmt.name}: the int8 nested GEMV serves 3 or 4 widths, not {len(widths)}")
    w = list(widths)

    @T.macro
    def run_task(segs, scale, zero, prec, expert_ids, y, sx, xsum, x8, acc, yacc, task):
        """Parallel task ``task``: routed row ``task % top_k`` at its run-time width, row tile ``task // top_k``."""
        if expert_ids[task % top_k] >= 0:
            for v in T.unroll(vecs):
                for lane in T.vectorized(LANES):
                    yacc[v, lane] = T.float32(0)
            if prec[expert_ids[task % top_k]] == w[0]:
                nests[0](segs, scale, zero, sx, xsum, x8, yacc, acc, expert_ids[task % top_k], task,
                         task % top_k * xstride)
            elif prec[expert_ids[task % top_k]] == w[1]:
                nests[1](segs, scale, zero, sx, xsum, x8, yacc, acc, expert_ids[task % top_k], task,
                         task % top_k * xstride)
            elif four and prec[expert_ids[task % top_k]] == w[2]:
                nests[2](segs, scale, zero, sx, xsum, x8, yacc, acc, expert_ids[task % top_k], task,
                         task % top_k * xstride)
            else:  # the widest (the session refuses widths the format does not serve)
                nests[-1](segs, scale, zero, sx, xsum, x8, yacc, acc, expert_ids[task % top_k], task,
                          task % top_k * xstride)
            for v in T.unroll(vecs):
                if task // top_k * vecs + v < nb:
                    for lane in T.vectorized(LANES):
                        y[task % top_k, (task // top_k * vecs + v) * LANES + lane] = yacc[v, lane]

    @T.macro
    def body(x, segs, scale, zero, prec, expert_ids, y):
        sx = T.alloc_buffer((xr, groups), "float32")
        xsum = T.alloc_buffer((xr, groups), "int32")
        xq = T.alloc_buffer((xr, k), "int8")
        x8 = T.alloc_buffer((xr, k), "int8")
        prep(x, sx, xsum, xq, x8)
        if task_lanes > 0:  # tasks taken dynamically (int8_common: claimed tasks)
            claims = T.alloc_buffer((claim_words,), "uint32")  # one bit per task, on the stack
            for c in range(claim_words):
                claims[c] = T.uint32(0)
            for cl in T.parallel(task_lanes):
                acc = T.alloc_buffer((2 * vecs, LANES), "int32", scope=stack_scope(2 * vecs * LANES * 4))
                yacc = T.alloc_buffer((vecs, LANES), "float32", scope=stack_scope(vecs * LANES * 4))
                for j in range(ntask):
                    if unclaimed(claims, lane_task(cl, j, ntask, task_lanes)):
                        if claim(claims, lane_task(cl, j, ntask, task_lanes)):
                            run_task(segs, scale, zero, prec, expert_ids, y, sx, xsum, x8, acc, yacc,
                                     lane_task(cl, j, ntask, task_lanes))
        else:
            for task in T.parallel(ntask):  # tile-major (int8_common: routed task order)
                # register tiles on the stack, the expert id, width and activation row read in place: a "local"
                # buffer or a bound scalar is a TVM workspace alloc/free per task (kernels/scopes.py)
                acc = T.alloc_buffer((2 * vecs, LANES), "int32", scope=stack_scope(2 * vecs * LANES * 4))
                yacc = T.alloc_buffer((vecs, LANES), "float32", scope=stack_scope(vecs * LANES * 4))
                run_task(segs, scale, zero, prec, expert_ids, y, sx, xsum, x8, acc, yacc, task)

    def seg_shape(s):
        return (experts, nt, k * fmt.segment_bits[s] // 32, tile)

    if nseg == 4:
        @T.prim_func
        def gemv(x: T.Buffer((xr, k), "float32"), seg0: T.Buffer(seg_shape(0), "uint32"),
                 seg1: T.Buffer(seg_shape(1), "uint32"), seg2: T.Buffer(seg_shape(2), "uint32"),
                 seg3: T.Buffer(seg_shape(3), "uint32"), scale: T.Buffer((experts, nt, groups, tile), "float16"),
                 zero: T.Buffer((experts, nt, zw, tile), "uint32"), prec: T.Buffer((experts,), "int32"),
                 expert_ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
            T.func_attr({"global_symbol": "gemv", "tirx.noalias": True, "moec.row_guard": True})
            body(x, [seg0, seg1, seg2, seg3], scale, zero, prec, expert_ids, y)
    elif nseg == 3:
        @T.prim_func
        def gemv(x: T.Buffer((xr, k), "float32"), seg0: T.Buffer(seg_shape(0), "uint32"),
                 seg1: T.Buffer(seg_shape(1), "uint32"), seg2: T.Buffer(seg_shape(2), "uint32"),
                 scale: T.Buffer((experts, nt, groups, tile), "float16"),
                 zero: T.Buffer((experts, nt, zw, tile), "uint32"), prec: T.Buffer((experts,), "int32"),
                 expert_ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
            T.func_attr({"global_symbol": "gemv", "tirx.noalias": True, "moec.row_guard": True})
            body(x, [seg0, seg1, seg2], scale, zero, prec, expert_ids, y)
    else:
        raise MoecError(f"{fmt.name}: the int8 nested GEMV takes 3 or 4 segments, not {nseg}")
    return gemv
