"""x86 prefill grouped GEMM with int8 activations, written as explicit TIR: AVX-512 VNNI (``vpdpbusd``), or AVX2
at 2, 4 and 8 bits on the dots of :mod:`moec.lower.schedules.x86_avx2` (same kernel on a ``DotIsa``).

The prefill counterpart of :mod:`moec.lower.schedules.x86_vnni`: the same code extraction
(:func:`~moec.lower.schedules.x86_vnni._step_dots`), activation quantization and group scaling,
so a token's output row equals the int8-activation decode GEMV's for that token (bit for bit: the
integer sums are exact on both ISAs). Numerics: :func:`moec.lower.kernels.activations.quantize_activations`.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.grouped_gemm import GroupedGemmSpec
from moec.lower.kernels.layout import num_tiles, zero_words
from moec.lower.kernels.signature import UNUSED, drop_params
from moec.lower.schedules.int8_common import DotIsa, plane_slot_source, quantize_rows_prep, scaled_group_sum
from moec.lower.schedules.x86_vnni import _step_dots, broadcast4, step_operands, vnni_isa


def vnni_grouped_gemm(spec: GroupedGemmSpec, params, portable: bool = False) -> tirx.PrimFunc:
    """The AVX-512 VNNI int8 grouped GEMM (:func:`int8_grouped_gemm`); ``portable``: the VNNI and VBMI instructions
    as plain TIR (``x86_vnni.portable_dpbusd``; tests on hosts without them)."""
    return int8_grouped_gemm(spec, params, vnni_isa(portable), portable=portable)


def int8_grouped_gemm(spec: GroupedGemmSpec, params, isa: DotIsa, portable: bool = False) -> tirx.PrimFunc:
    """``y[p] = x[rows[p]] @ W[e].T`` for ``offsets[e] <= p < offsets[e+1]``, int8 activations.

    Every row of ``x`` (float32 ``[R, K]``) is quantized once per call, in parallel over rows
    (per group: ``sx = max|x| / 127``, codes in the order the dots consume them, their sum);
    ``rows`` (int32 ``[P]``) gathers the quantized rows for the sorted pairs, so the caller
    passes the layer's token rows, not ``top_k`` copies of them. Parallel over tiles of
    ``gemm_vectors`` vectors of rows (``X86Params.gemm_block``: 8, a whole tile, on 128-row tiles)
    of every expert, in ``gemm_split`` parts (see ``split``: the threads share every expert's rows
    whatever the routing). Per block of ``gemm_tokens``
    tokens and step of codes, each vector's codes are extracted into bytes once and dotted
    (``isa.dot``) against every token's four activations (broadcast), into ``vectors × tokens``
    int32 accumulators that are scaled into float32 once per group; an expert with at least
    ``gemm_unpack_tokens[bits]`` tokens instead unpacks its rows' codes into a byte workspace once
    (see the comment at ``unpack_tokens``). Experts without tokens cost nothing. On an ISA with two-step
    dots (AVX2, codes up to 4 bits) a step's planes add up in int16 (at most 4 pairs of ``2·15·127``)
    before one widening per token; 8-bit codes on signed-code ISAs are recentred (as the GEMV does).
    ``params`` is an :class:`~moec.lower.schedules.x86.X86Params` whose ``lanes`` are ``isa``'s;
    ``portable``: 3-bit codes extracted without VBMI.
    """
    bits, n, k, gs, lanes, tile = spec.bits, spec.n, spec.k, spec.group_size, params.lanes, spec.tile
    if lanes != isa.lanes or tile % lanes or n % lanes:
        raise MoecError(f"the int8 grouped GEMM needs {isa.lanes}-row vectors dividing N ({n}) and the tile ({tile})")
    if bits == 3 and lanes != 16:
        raise MoecError("3-bit int8 grouped GEMM codes need 16 lanes (AVX-512 VBMI)")
    recentre = 128 if bits == 8 and not isa.unsigned_codes else 0  # signed code bytes: q - 128
    pair_sums = isa.pairs is not None and bits <= 4
    step_words = 3 if bits == 3 else 1
    step_codes = 32 * step_words // bits
    if gs % step_codes:
        raise MoecError(f"{bits}-bit int8-activation GEMM needs group_size a multiple of {step_codes}")
    steps_per_group, groups = gs // step_codes, k // gs
    (vecs, tb), experts = params.gemm_block(spec.tile), spec.num_stacked
    nb = n // lanes
    tiles = -(-nb // vecs)
    # tasks in ``split`` parts (:func:`split_tasks`)
    split = max(1, min(params.gemm_split, tiles))
    per_split = -(-tiles // split)
    nt = num_tiles(n, tile)
    prep = quantize_rows_prep(k, gs, 16 if gs % 16 == 0 else gs, step_codes,
                              (lambda c: c) if bits == 3 else plane_slot_source(bits))

    def words_of(weight, e, gv, step):
        def words(i):
            return weight[e, gv * lanes // tile, step * step_words + i, T.ramp(gv * lanes % tile, 1, lanes)]
        return words

    def step_dots(value, weight, x8, row, e, gv, step):
        terms = []
        for codes, x4 in step_operands(bits, words_of(weight, e, gv, step), x8, row, step * step_codes, lanes,
                                       portable=portable, recentre=recentre):
            if pair_sums:
                terms.append(isa.pairs(codes, x4))
            else:
                value = isa.dot(value, codes, x4)
        return value + isa.quads(sum(terms[1:], terms[0])) if pair_sums else value

    @T.macro
    def gemm_step(acc, weight, x8, tok, e, gv, v, step):
        """One step of codes of vector ``gv`` against the block's tokens (accumulators ``v*tb + r``)."""
        for r in T.unroll(tb):
            acc[v * tb + r, T.ramp(0, 1, lanes)] = step_dots(acc[v * tb + r, T.ramp(0, 1, lanes)],
                                                              weight, x8, tok[r], e, gv, step)

    def unpacked_word(weight, e, gv, step, d):
        """Dot ``d`` (a constant once unrolled) of a 3-bit step's codes: one code per byte, as uint32x16."""
        dots = [codes for codes, _ in _step_dots(bits, words_of(weight, e, gv, step), portable=portable, lanes=lanes)]
        value = dots[-1]
        for i in range(len(dots) - 2, -1, -1):  # folds to one dot once d is a constant
            value = T.if_then_else(d == i, dots[i], value)
        return value

    @T.macro
    def unpack_tile(ws, weight, e, gv0):
        """Every 3-bit code of the task's vectors into bytes of ``ws`` once (word ``w``: codes 4w..4w+3)."""
        for v in T.unroll(vecs):
            if gv0 + v < nb:
                for step in range(k // step_codes):
                    for d in T.unroll(step_codes // 4):
                        ws[v, step * (step_codes // 4) + d, T.ramp(0, 1, lanes)] = unpacked_word(
                            weight, e, gv0 + v, step, d)

    @T.macro
    def packed_group(acc, ws, weight, x8, tok, e, gv0, g):
        for st in range(steps_per_group):
            for v in T.unroll(vecs):
                if gv0 + v < nb:
                    gemm_step(acc, weight, x8, tok, e, gv0 + v, v, g * steps_per_group + st)

    unpacked_group = unpacked_group_dots(isa, vecs, tb, nb, gs)

    # Experts with at least ``unpack_tokens`` tokens unpack their rows' codes to bytes once per call,
    # and every token block then runs the 8-bit inner loop over them: at 3 bits the extraction
    # costs about as much as a block's dot products, once per expert it amortizes over its tokens.
    # Fewer tokens (and 2/4/8 bits, by default) extract per block.
    unpack_tokens = dict(params.gemm_unpack_tokens).get(bits, 1 << 30)
    sg = spec.super_groups

    def group_term(dot, scale, zero, sx, xsum, e, gv, g, lane, row, sup):
        t, col = gv * lanes // tile, gv * lanes % tile + lane
        return scaled_group_sum(dot, scale, zero, sx, xsum, e, t, col, g, row, bits, recentre, super_scale=sup,
                                super_groups=sg)

    packed_blocks, unpacked_blocks = (token_block_loop(vecs, tb, nb, lanes, groups, steps, group_term)
                                      for steps in (packed_group, unpacked_group))

    @T.macro
    def run_task(rows, weight, scale, sup, zero, y, sx, xsum, x8, acc, yacc, tok, gv0, e, start, count, _extra):
        if count >= unpack_tokens:
            ws = T.alloc_buffer((vecs, k // 4, lanes), "uint32")
            unpack_tile(ws, weight, e, gv0)
            unpacked_blocks(rows, weight, scale, sup, zero, y, sx, xsum, x8, acc, yacc, tok, ws, gv0, e,
                            start, count)
        else:
            packed_blocks(rows, weight, scale, sup, zero, y, sx, xsum, x8, acc, yacc, tok, acc, gv0, e,
                          start, count)

    body = split_tasks(split, experts, per_split, tiles, (vecs, tb), lanes, k, groups, prep, run_task)

    zw = zero_words(groups, bits)
    dq = sg > 0  # double-quantized scales: uint8 codes and fp16 super-scales
    sdt, sup_shape = ("uint8", (experts, nt, (groups + sg - 1) // sg, tile)) if dq else ("float16", UNUSED)

    @T.prim_func  # (without super-scales, kernels/signature.py drops the parameter)
    def grouped_gemm(x_h: T.handle, rows_h: T.handle, weight: T.Buffer((experts, nt, k * bits // 32, tile), "uint32"),
                     scale: T.Buffer((experts, nt, groups, tile), sdt), super_scale: T.Buffer(sup_shape, "float16"),
                     zero: T.Buffer((experts, nt, zw, tile), "uint32"),
                     offsets: T.Buffer((experts + 1,), "int32"), y_h: T.handle):
        T.func_attr({"global_symbol": "grouped_gemm", "tirx.noalias": True})
        xrows = T.int32()
        pairs = T.int32()
        x = T.match_buffer(x_h, (xrows, k), "float32")
        rows = T.match_buffer(rows_h, (pairs,), "int32")
        y = T.match_buffer(y_h, (pairs, n), "float32")
        body(x, rows, xrows, weight, scale, super_scale if dq else None, zero, offsets, y, None)

    return drop_params(grouped_gemm, [] if dq else ["super_scale"])


def unpacked_group_dots(isa: DotIsa, vecs: int, tb: int, nb: int, gs: int, guarded: bool = True,
                        pair_words: int = 0):
    """The macro ``unpacked_group(acc, ws, weight, x8, tok, e, gv0, g)``: group ``g``'s dots of the task's unpacked
    codes (``ws[v, word]``: 4 code bytes a row, word ``w`` dotted with activations ``4w .. 4w + 3``) against the
    block's ``tb`` tokens, one dot per word, vector and token (``weight`` unused: the group-steps signature).
    ``guarded``: vectors past the last (``gv0 + v >= nb``) are skipped; else every ``vecs`` vectors of ``ws``
    are dotted (the caller fills them: a guard per vector in this loop made LLVM store every accumulator
    to the stack after each dot). ``pair_words`` (an ISA with two-step dots, code bytes 0..15 only): the
    first steps (:attr:`DotIsa.pairs`) of that many words add up in int16 (at most ``pair_words · 2·15·127``,
    exact up to 8) before one second step (:attr:`DotIsa.quads`), instead of a whole dot per word."""
    lanes = isa.lanes
    if pair_words and (isa.pairs is None or pair_words > 8 or (gs // 4) % pair_words):
        raise MoecError(f"internal: {pair_words} pair words need two-step dots and to divide {gs // 4} words")

    @T.macro
    def unpacked_step(acc, ws, x8, tok, v, word):
        """One word of unpacked codes (4 per row) of vector ``v`` against the block's tokens."""
        for r in T.unroll(tb):
            acc[v * tb + r, T.ramp(0, 1, lanes)] = isa.dot(
                acc[v * tb + r, T.ramp(0, 1, lanes)], ws[v, word, T.ramp(0, 1, lanes)], broadcast4(x8, tok[r], word * 4, lanes))

    def word_pairs(ws, x8, row, v, word):
        return sum((isa.pairs(ws[v, word + i, T.ramp(0, 1, lanes)], broadcast4(x8, row, (word + i) * 4, lanes))
                    for i in range(1, pair_words)),
                   isa.pairs(ws[v, word, T.ramp(0, 1, lanes)], broadcast4(x8, row, word * 4, lanes)))

    @T.macro
    def paired_step(acc, ws, x8, tok, v, word):
        """``pair_words`` words of vector ``v`` from ``word`` on against the block's tokens, one second step each."""
        for r in T.unroll(tb):
            acc[v * tb + r, T.ramp(0, 1, lanes)] = acc[v * tb + r, T.ramp(0, 1, lanes)] + isa.quads(
                word_pairs(ws, x8, tok[r], v, word))

    @T.macro
    def unpacked_group(acc, ws, weight, x8, tok, e, gv0, g):
        for st in range(gs // 4):
            for v in T.unroll(vecs):
                if gv0 + v < nb:
                    unpacked_step(acc, ws, x8, tok, v, g * (gs // 4) + st)

    @T.macro
    def unguarded_group(acc, ws, weight, x8, tok, e, gv0, g):
        for st in range(gs // 4):
            for v in T.unroll(vecs):
                unpacked_step(acc, ws, x8, tok, v, g * (gs // 4) + st)

    @T.macro
    def paired_group(acc, ws, weight, x8, tok, e, gv0, g):
        for st in range(gs // 4 // max(pair_words, 1)):
            for v in T.unroll(vecs):
                paired_step(acc, ws, x8, tok, v, g * (gs // 4) + st * pair_words)

    if pair_words:
        if guarded:
            raise MoecError("internal: paired unpacked dots are unguarded")
        return paired_group
    return unpacked_group if guarded else unguarded_group


def token_block_loop(vecs: int, tb: int, nb: int, lanes: int, groups: int, group_steps, group_term):
    """The grouped GEMM's macro ``gemm_blocks(rows, weight, scale, sup, zero, y, sx, xsum, x8, acc, yacc, tok, ws,
    gv0, e, start, count)``: an expert's ``count`` tokens (sorted pairs from ``start``, activation rows
    ``rows[p]``) in blocks of ``tb``, per group ``group_steps`` (a macro adding the group's int32 dots of the
    task's ``vecs`` vectors into ``acc``) then ``group_term(dot, scale, zero, sx, xsum, e, gv, g, lane, row, sup)``
    added into float32 accumulators, stored into ``y`` once a block (``nb`` vectors in all)."""
    @T.macro
    def gemm_blocks(rows, weight, scale, sup, zero, y, sx, xsum, x8, acc, yacc, tok, ws, gv0, e, start, count):
        """The expert's tokens in blocks of ``tb``: int32 dots per group, scaled into float32 accumulators."""
        for blk in range((count + tb - 1) // tb):
            for r in T.unroll(tb):
                # tail slots of a block recompute the block's last token (never stored)
                tok[r] = rows[start + T.min(blk * tb + r, count - 1)]
            for a in T.unroll(vecs * tb):
                for lane in T.vectorized(lanes):
                    yacc[a, lane] = T.float32(0)
            for g in range(groups):
                for a in T.unroll(vecs * tb):
                    for lane in T.vectorized(lanes):
                        acc[a, lane] = 0
                group_steps(acc, ws, weight, x8, tok, e, gv0, g)
                for v in T.unroll(vecs):
                    if gv0 + v < nb:
                        for r in T.unroll(tb):
                            for lane in T.vectorized(lanes):
                                yacc[v * tb + r, lane] = yacc[v * tb + r, lane] + group_term(
                                    acc[v * tb + r, lane], scale, zero, sx, xsum, e,
                                    gv0 + v, g, lane, tok[r], sup)
            for v in T.unroll(vecs):
                if gv0 + v < nb:
                    for r in T.unroll(tb):
                        if blk * tb + r < count:
                            for lane in T.vectorized(lanes):
                                y[start + blk * tb + r, (gv0 + v) * lanes + lane] = \
                                    yacc[v * tb + r, lane]
    return gemm_blocks


def split_tasks(split: int, experts: int, per_split: int, tiles: int, block: tuple[int, int], lanes: int, k: int,
                groups: int, prep, run_task):
    """The int8 grouped GEMMs' macro ``body(x, rows, xrows, weight, scale, sup, zero, offsets, y, extra)``: every row
    of ``x`` quantized once (``prep``), then the tasks in parallel, each ``block[0]`` vectors (task-tile ``tl``,
    first vector ``gv0``) of expert ``e``'s rows against its ``count`` sorted pairs from ``start``, run by the macro
    ``run_task(rows, weight, scale, sup, zero, y, sx, xsum, x8, acc, yacc, tok, gv0, e, start, count, extra)``
    with ``block[0] × block[1]`` accumulators.

    Tasks come in ``split`` contiguous ranges, each with 1/split of every expert's ``tiles`` task-tiles
    (expert-major inside a range). TVM gives each thread a contiguous range of tasks, so with a thread count
    dividing ``split`` every thread gets its share of every expert's rows whatever the routing (all
    expert-major, one thread got the busy experts), and consecutive tasks still share an expert's token
    rows (its x8 rows stay in cache)."""
    vecs, tb = block

    @T.macro
    def body(x, rows, xrows, weight, scale, sup, zero, offsets, y, extra):
        sx = T.alloc_buffer((xrows, groups), "float32")
        xsum = T.alloc_buffer((xrows, groups), "int32")
        x8 = T.alloc_buffer((xrows, k), "int8")  # per step, in the order the dot products consume it
        prep(x, xrows, sx, xsum, x8)
        for task in T.parallel(split * experts * per_split):
            acc = T.alloc_buffer((vecs * tb, lanes), "int32", scope="local")
            yacc = T.alloc_buffer((vecs * tb, lanes), "float32", scope="local")
            tok = T.alloc_buffer((tb,), "int32", scope="local")
            tl: T.int32 = task // (experts * per_split) * per_split + task % per_split
            gv0: T.int32 = tl * vecs
            e: T.int32 = task // per_split % experts
            start: T.int32 = offsets[e]
            count: T.int32 = offsets[e + 1] - start
            if tl < tiles:  # (the last part may be padding)
                run_task(rows, weight, scale, sup, zero, y, sx, xsum, x8, acc, yacc, tok, gv0, e, start, count, extra)

    return body
