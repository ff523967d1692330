"""x86 decode GEMV with int8 activations, written as explicit TIR: AVX-512 VNNI (``vpdpbusd`` dot products),
or AVX2 with the dots of :mod:`moec.lower.schedules.x86_avx2` (same kernel, 8 lanes, signed code bytes).

TVM's ``tensorize`` crashes in apache-tvm 0.27.0.post1 (a segfault in ``ToJSONGraph`` for any
tensor intrinsic, including TVM's own ``dot_16x4_vnni``), so this kernel is written directly
with vector loads and the ``llvm.x86.avx512.vpdpbusd.512`` intrinsic instead of scheduling a
target-neutral definition. Numerics: :func:`moec.lower.kernels.activations.quantize_activations`.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from math import gcd

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.layout import num_tiles, zero_words
from moec.lower.kernels.rowwise import fast_silu
from moec.lower.kernels.scopes import stack_scope
from moec.lower.kernels.signature import UNUSED, drop_params
from moec.lower.schedules.int8_common import (BYTE_MASK, DotIsa, claim, claim_lanes, gfni_nibble_down, lane_task,
                                              plain_select, plane_slot_source, quantize_activations_prep, scaled_group_sum,
                                              splat, unclaimed)


def _dpbusd(acc, codes, x4):
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, codes, x4)


def portable_dpbusd(acc, codes, x4):
    """What ``vpdpbusd`` computes (per int32 lane, ``acc`` plus the 4 products of unsigned ``codes`` bytes and
    signed ``x4`` bytes), in plain vector TIR that any LLVM target compiles: the kernels' indexing and
    numerics are then tested on x86 hosts without AVX-512 VNNI (``portable=True``)."""
    cw = T.reinterpret("uint32x16", codes)
    xi = T.reinterpret("int32x16", x4)
    for j in range(4):
        c = T.reinterpret("int32x16", (cw >> splat(8 * j, 16, "uint32")) & splat(0xFF, 16, "uint32"))
        acc = acc + c * ((xi << splat(24 - 8 * j, 16, "int32")) >> splat(24, 16, "int32"))
    return acc


def _multishift(ctrl, data):
    return T.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.pmultishift.qb.512", ctrl, data)


def portable_multishift(ctrl_value: int):
    """``vpmultishiftqb`` with a constant control (byte ``j`` of each 64-bit lane: the 8 bits of that lane
    from bit ``ctrl_j``, none wrapping past bit 63 here) in plain vector TIR."""
    offsets = [(ctrl_value >> (8 * j)) & 63 for j in range(8)]
    if any(o > 56 for o in offsets):
        raise ValueError("a wrapping vpmultishiftqb offset")

    def shift(ctrl, data):
        q = T.reinterpret("uint64x8", data)
        out = None
        for j, o in enumerate(offsets):
            part = ((q >> splat(o, 8, "uint64")) & splat(0xFF, 8, "uint64")) << splat(8 * j, 8, "uint64")
            out = part if out is None else out | part
        return T.reinterpret("int8x64", out)
    return shift


def dot_instructions(portable: bool):
    """(dpbusd, multishift(ctrl_value) -> (ctrl, data) -> int8x64): the instructions, or plain TIR doing the same."""
    if portable:
        return portable_dpbusd, portable_multishift
    return _dpbusd, lambda ctrl_value: _multishift


def _step_dots(bits: int, words, masked: bool = False, portable: bool = False, lanes: int = 16):
    """(uint32 x ``lanes`` codes, activation slot) pairs covering one step of a row tile: four code
    bytes per lane, one per byte.

    A step is one word (2/4/8 bits: 32/b codes; plane ``t`` puts code ``m*P + t`` in byte ``m``)
    or three words (3 bits: 32 codes). ``masked`` (2 and 4 bits): an odd plane is masked in place,
    not shifted down, so its bytes hold ``code << bits`` (``w & 0x0C..`` at 2 bits, ``w & 0xF0..``
    at 4); the caller sums odd planes in their own accumulator and shifts it right by ``bits`` once
    per group (exact: every term is a multiple of ``2**bits``). 2 bits: one shift a step, not 3;
    4 bits: none, not 1. For 3 bits (16 lanes, AVX-512 VBMI), four 32-bit windows at bits 0, 24, 48, 72 of
    the 96-bit chunk (funnel shifts) each hold 8 whole codes; ``vpmultishiftqb`` copies the bytes
    at bit offsets 0,3,6,9 (then 12..21) of each row's window into that row's four bytes, and a
    ``& 7`` leaves one code per byte, in code order.
    """
    if masked:
        planes = 8 // bits
        return [(_shifted(words(0), 2 * bits * (t // 2), lanes)
                 & splat(BYTE_MASK[bits] << (bits * (t % 2)), lanes, "uint32"), 4 * t)
                for t in range(planes)]
    if bits != 3:
        planes = 8 // bits
        return [(_shifted(words(0), t * bits, lanes) & splat(BYTE_MASK[bits], lanes, "uint32"), 4 * t)
                for t in range(planes)]
    if lanes != 16:
        raise MoecError("3-bit int8-activation codes need 16 lanes (vpmultishiftqb)")
    w0, w1, w2 = words(0), words(1), words(2)
    windows = [w0, (w0 >> splat(24, 16, "uint32")) | (w1 << splat(8, 16, "uint32")),
               (w1 >> splat(16, 16, "uint32")) | (w2 << splat(16, 16, "uint32")),
               w2 >> splat(8, 16, "uint32")]
    dots = []
    for k, window in enumerate(windows):
        for half in range(2):
            offsets = [3 * (4 * half + m) for m in range(4)]
            ctrl = sum(o << (8 * m) for m, o in enumerate(offsets + [32 + o for o in offsets]))
            picked = dot_instructions(portable)[1](ctrl)(
                T.reinterpret("int8x64", splat(ctrl, 8, "uint64")), T.reinterpret("int8x64", window))
            dots.append((T.reinterpret("uint32x16", picked) & splat(0x07070707, 16, "uint32"), 8 * k + 4 * half))
    return dots


def broadcast4(x8, row, at, lanes: int):
    """Activations ``x8[row, at:at+4]`` as one int32 broadcast to every row of the vector (int8 x 4·lanes)."""
    return T.reinterpret(f"int8x{4 * lanes}", T.Broadcast(T.reinterpret("int32", x8[row, T.ramp(at, 1, 4)]), lanes))


def step_operands(bits: int, words, x8, row, first_code, lanes: int, masked: bool = False, portable: bool = False,
                  recentre: int = 0):
    """(codes, activations) of each dot of one step whose codes start at ``first_code`` (:func:`_step_dots`; codes
    recentred to ``q − 128`` when ``recentre``, for signed-code dots)."""
    for codes, slot in _step_dots(bits, words, masked, portable, lanes):
        if recentre:
            codes = codes ^ splat(0x80808080, lanes, "uint32")
        yield codes, broadcast4(x8, row, first_code + slot, lanes)


def vnni_isa(portable: bool = False, claim_lanes: int = 0, expert_major_claims: bool = False,
             gfni: bool = False) -> DotIsa:
    """The AVX-512 VNNI :class:`~moec.lower.schedules.int8_common.DotIsa`: 16 lanes, ``vpdpbusd`` (unsigned
    code bytes), ``vpternlogd`` selects (``portable``: both as plain TIR); ``gfni`` (the target has it, not
    ``portable``): high nibbles moved down by one ``vgf2p8affineqb``."""
    dpbusd = dot_instructions(portable)[0]
    return DotIsa(16, lambda acc, codes, x4: dpbusd(acc, T.reinterpret("int8x64", codes), x4),
                  plain_select(16) if portable else _ternary_select, unsigned_codes=True, claim_lanes=claim_lanes,
                  expert_major_claims=expert_major_claims,
                  nibble_down=gfni_nibble_down(16) if gfni and not portable else None)


def _ternary_select(a, b, mask: int):
    """``(a & mask) | (b & ~mask)``: one ``vpternlogd`` (``mask ? a : b`` bitwise, immediate 0xCA),
    called as the intrinsic so LLVM cannot push the byte masks after it through the selects into
    per-part masks (which doubled the nested 8-bit step's instructions)."""
    out = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.pternlog.d.512",
                                  T.reinterpret("int32x16", splat(mask & 0xFFFFFFFF, 16, "uint32")),
                                  T.reinterpret("int32x16", a), T.reinterpret("int32x16", b), T.int32(0xCA))
    return T.reinterpret("uint32x16", out)


def vnni_gemv(spec: GemvSpec, params, portable: bool = False) -> tirx.PrimFunc:
    """The AVX-512 VNNI int8-activation GEMV (:func:`int8_gemv`); ``portable``: the VNNI and VBMI instructions
    as plain TIR (:func:`portable_dpbusd`; tests on hosts without them)."""
    return int8_gemv(spec, params, vnni_isa(portable), portable=portable)


def _shifted(word, amount: int, lanes: int):
    return word >> splat(amount, lanes, "uint32") if amount else word


def _unshift(value, chain, odd_shift: int):
    """``value >> odd_shift`` for an odd ``chain`` (arithmetic; ``chain`` a loop variable of a fully unrolled
    loop, so the amount folds to a constant), ``value`` itself when nothing is masked in place."""
    return T.shift_right(value, odd_shift * (chain % 2)) if odd_shift else value


def int8_gemv(spec: GemvSpec, params, isa: DotIsa, portable: bool = False) -> tirx.PrimFunc:
    """The int8-activation GEMV for ``spec`` (a :class:`~moec.lower.kernels.gemv.GemvSpec`) on ``isa``.

    Per step of 32/b codes (one word; 32 codes = 3 words at 3 bits) and vector of ``isa.lanes`` rows,
    the ISA's dot (``vpdpbusd`` on VNNI; ``x86_avx2`` on AVX2) multiplies the rows' codes, four per row
    and dot, by four int8 activations broadcast to all rows (see :func:`_step_dots` for how codes reach bytes; ``x8``
    is stored in the order the dots consume it, permuted within each step once per call).
    Group sums are scaled once per group. Same parameters as the float32-activation GEMV. A row
    whose expert id is -1 reads no weight and is written 0 (attributes ``moec.row_guard`` and
    ``moec.row_zero``). ``spec.swiglu``: a task computes its rows of the gate, then the same rows of
    up (from ``[w1; w3]``, or ``w3``'s own arrays with ``spec.separate_up``), and writes
    ``silu(gate) * up`` (:func:`~moec.lower.kernels.rowwise.fast_silu`, as ``row_silu``).
    ``params`` is an :class:`~moec.lower.schedules.x86.X86Params` (lanes, int8_tile_vectors,
    int8_chains, int8_plane_masks, int8_claim_lanes, prefetch_words, prefetch_locality; ``lanes`` that of
    ``isa``). ``isa`` a :class:`~moec.lower.schedules.int8_common.DotIsa`: with signed code bytes (AVX2)
    8-bit codes are recentred to ``q − 128`` and the zero point shifted to match, and odd planes are
    never masked in place (a masked byte can exceed 127). ``portable``: 3-bit codes extracted without
    ``vpmultishiftqb`` (VBMI).
    """
    bits, n, k, gs, lanes = spec.bits, spec.n, spec.k, spec.group_size, params.lanes
    step_words = 3 if bits == 3 else 1
    step_codes = 32 * step_words // bits
    steps_per_group = gs // step_codes
    experts, top_k, vecs, tile = spec.num_stacked, spec.top_k, params.int8_tile_vectors, spec.tile
    nb, groups = n // lanes, k // gs
    tiles = -(-nb // vecs)  # parallel tasks per routed expert
    if tile % lanes:
        raise MoecError(f"layout tile {tile} is not a whole number of {lanes}-row vectors")
    prefetch, locality = params.prefetch_words, params.prefetch_locality
    vl = gcd(gs, lanes)  # vector width of the activation quantization
    prefetch_lines = step_words if prefetch > 0 else 0
    xr = top_k if spec.x_per_expert else 1
    xstride = 1 if spec.x_per_expert else 0
    dots_per_step = 8 if bits == 3 else 8 // bits
    chains = max(1, min(params.int8_chains, dots_per_step))
    # odd planes masked in place (_step_dots): chain c holds planes t = c mod chains, so with an even
    # number of chains each chain's planes share one power of two, undone once per group
    masked = isa.unsigned_codes and params.int8_plane_masks and bits in (2, 4) and chains % 2 == 0
    recentre = 128 if bits == 8 and not isa.unsigned_codes else 0  # signed bytes: q - 128
    odd_shift = bits if masked else 0  # what an odd chain's sum is shifted right by, once per group
    # two-step dots (AVX2) at 2 and 4 bits: a block's first steps add up in int16 (at most 8 pair sums of
    # codes 0..15 per int16 lane: exact), one second step a block
    pair_steps = gcd(steps_per_group, bits) if isa.pairs is not None and bits in (2, 4) else 0
    acc_scope = stack_scope(vecs * lanes * 4)
    acc1_scope = stack_scope(vecs * max(chains - 1, 1) * lanes * 4)
    if lanes != isa.lanes:
        raise MoecError(f"internal: {lanes}-lane parameters for an ISA of {isa.lanes} int32 lanes")
    if gs % step_codes:
        raise MoecError(f"{bits}-bit int8-activation GEMV needs group_size a multiple of {step_codes}")

    # 3 bits: the dots consume a step's activations in code order (see _step_dots).
    prep = quantize_activations_prep(xr, k, gs, vl, step_codes,
                                     (lambda c: c) if bits == 3 else plane_slot_source(bits))

    def operands(weight, x8, e, gv, step, r):
        """(codes, activations) of each dot of one step of global vector ``gv``."""
        def words(i):
            return weight[e, gv * lanes // tile, step * step_words + i,
                          T.ramp(gv * lanes % tile, 1, lanes)]
        return step_operands(bits, words, x8, r, step * step_codes, lanes, masked, portable, recentre)

    def accumulate(acc0, acc1, v, c, weight, x8, e, gv, step, r):
        """New value of accumulator ``c`` of vector ``v`` (global vector ``gv``) after one step."""
        sums = [acc0[v, T.ramp(0, 1, lanes)]] + [acc1[v * (chains - 1) + c - 1, T.ramp(0, 1, lanes)]
                                                 for c in range(1, chains)]
        for d, (codes, x4) in enumerate(operands(weight, x8, e, gv, step, r)):
            sums[d % chains] = isa.dot(sums[d % chains], codes, x4)
        value = sums[-1]
        for i in range(chains - 2, -1, -1):  # folds to one chain once c is a constant
            value = T.if_then_else(c == i, sums[i], value)
        return value

    def step_pairs(weight, x8, e, gv, step, r):
        """int16 pair sums of one step's code planes (0..15 a byte) times their activations."""
        terms = [isa.pairs(codes, x4) for codes, x4 in operands(weight, x8, e, gv, step, r)]
        return sum(terms[1:], terms[0])

    sg = spec.super_groups

    def group_term(dot, scale, zero, sx, xsum, e, gv, g, lane, r, sup):
        """``scale * sx * (sum q*x8 - zero * sum x8)`` of group ``g``, row ``gv*lanes + lane``."""
        t, col = gv * lanes // tile, gv * lanes % tile + lane
        return scaled_group_sum(dot, scale, zero, sx, xsum, e, t, col, g, r, bits, recentre,
                                super_scale=sup, super_groups=sg)

    swiglu = spec.swiglu
    up_offset = 0 if spec.separate_up else nb  # w3's first vector in the weight it is read from
    ntask = top_k * tiles
    task_lanes = claim_lanes(ntask, params.int8_claim_lanes)  # 0: TVM's static split
    claim_words = -(-ntask // 32)

    def _lane_task(cl, j):  # expert-major claims (int8_common: claim order) unless turned off
        return lane_task(cl, j, ntask, task_lanes, tiles if params.int8_expert_major_claims else 0)

    @T.macro
    def fill(buf, rows, width, value):
        for a in T.unroll(rows):
            for lane in T.vectorized(width):
                buf[a, lane] = value

    @T.macro
    def add_group_terms(yacc, acc0, scale, sup, zero, sx, xsum, e, r, tt, off, g):
        """``yacc[v]`` += group ``g``'s scaled sum of every vector of the task."""
        for v in T.unroll(vecs):
            if tt * vecs + v < nb:
                for lane in T.vectorized(lanes):
                    yacc[v, lane] = yacc[v, lane] + group_term(
                        acc0[v, lane], scale, zero, sx, xsum, e, tt * vecs + v + off, g, lane, r, sup)

    @T.macro
    def project_pairs(weight, scale, sup, zero, x8, sx, xsum, acc0, acc1, yacc, e, r, tt, off):
        """:func:`project` with int16 sums (``pair_steps``): ``acc16`` holds each vector's sum of a block."""
        acc16 = T.alloc_buffer((vecs, 2 * lanes), "int16", scope=stack_scope(vecs * lanes * 4))
        fill(yacc, vecs, lanes, T.float32(0))
        for g in range(groups):
            fill(acc0, vecs, lanes, 0)
            for sb in range(steps_per_group // pair_steps):
                fill(acc16, vecs, 2 * lanes, T.int16(0))
                for st in T.unroll(pair_steps):
                    for v in T.unroll(vecs):
                        if tt * vecs + v < nb:
                            acc16[v, T.ramp(0, 1, 2 * lanes)] = acc16[v, T.ramp(0, 1, 2 * lanes)] + step_pairs(
                                weight, x8, e, tt * vecs + v + off, (g * steps_per_group + sb * pair_steps + st), r)
                for v in T.unroll(vecs):
                    if tt * vecs + v < nb:
                        acc0[v, T.ramp(0, 1, lanes)] = acc0[v, T.ramp(0, 1, lanes)] + isa.quads(
                            acc16[v, T.ramp(0, 1, 2 * lanes)], 1)
            add_group_terms(yacc, acc0, scale, sup, zero, sx, xsum, e, r, tt, off, g)

    @T.macro
    def project(weight, scale, sup, zero, x8, sx, xsum, acc0, acc1, yacc, e, r, tt, off):
        """``yacc[v]`` = rows of vector ``tt*vecs + v`` (``+ off`` in ``weight``) of expert ``e`` times
        activation row ``r``."""
        fill(yacc, vecs, lanes, T.float32(0))
        for g in range(groups):
            fill(acc0, vecs, lanes, 0)
            fill(acc1, vecs * (chains - 1), lanes, 0)
            for st in range(steps_per_group):
                for v in T.unroll(vecs):
                    if tt * vecs + v < nb:
                        for i in T.unroll(prefetch_lines):
                            T.evaluate(T.call_llvm_intrin(
                                "void", "llvm.prefetch", T.address_of(weight[
                                    e, (tt * vecs + v + off) * lanes // tile,
                                    (g * steps_per_group + st) * step_words + prefetch + i,
                                    (tt * vecs + v + off) * lanes % tile]),
                                T.int32(0), T.int32(locality), T.int32(1)))
                        for c in T.unroll(chains):
                            if c == 0:
                                acc0[v, T.ramp(0, 1, lanes)] = accumulate(
                                    acc0, acc1, v, c, weight, x8, e, tt * vecs + v + off, g * steps_per_group + st, r)
                            else:
                                acc1[v * (chains - 1) + c - 1, T.ramp(0, 1, lanes)] = accumulate(
                                    acc0, acc1, v, c, weight, x8, e, tt * vecs + v + off, g * steps_per_group + st, r)
            for v in T.unroll(vecs):
                for c in T.unroll(1, chains):
                    for lane in T.vectorized(lanes):
                        acc0[v, lane] = acc0[v, lane] + _unshift(acc1[v * (chains - 1) + c - 1, lane], c,
                                                                 odd_shift)
            add_group_terms(yacc, acc0, scale, sup, zero, sx, xsum, e, r, tt, off, g)

    rows = project_pairs if pair_steps else project

    @T.macro
    def run_task(x8, sx, xsum, weight, scale, sup, zero, weight_up, scale_up, sup_up, zero_up, expert_ids, y,
                 acc0, acc1, yacc, yup, task):
        """Parallel task ``task``: routed row ``task % top_k``, row tile ``task // top_k``."""
        if expert_ids[task % top_k] >= 0:  # a row routed to another bit class (id -1) does no work
            rows(weight, scale, sup, zero, x8, sx, xsum, acc0, acc1, yacc, expert_ids[task % top_k],
                 task % top_k * xstride, task // top_k, 0)
            if swiglu:
                rows(weight_up, scale_up, sup_up, zero_up, x8, sx, xsum, acc0, acc1, yup,
                     expert_ids[task % top_k], task % top_k * xstride, task // top_k, up_offset)
                for v in T.unroll(vecs):
                    if task // top_k * vecs + v < nb:
                        for lane in T.vectorized(lanes):
                            y[task % top_k, (task // top_k * vecs + v) * lanes + lane] = fast_silu(
                                yacc[v, lane]) * yup[v, lane]
            else:
                for v in T.unroll(vecs):
                    if task // top_k * vecs + v < nb:
                        for lane in T.vectorized(lanes):
                            y[task % top_k, (task // top_k * vecs + v) * lanes + lane] = yacc[v, lane]
        else:  # a -1 row is written 0 (moec.row_zero): callers need no mask (where) after the call
            for v in T.unroll(vecs):
                if task // top_k * vecs + v < nb:
                    for lane in T.vectorized(lanes):
                        y[task % top_k, (task // top_k * vecs + v) * lanes + lane] = T.float32(0)

    @T.macro
    def body(x, weight, scale, sup, zero, weight_up, scale_up, sup_up, zero_up, expert_ids, y):
        sx = T.alloc_buffer((xr, groups), "float32")
        xsum = T.alloc_buffer((xr, groups), "int32")
        xq = T.alloc_buffer((xr, k), "int8")  # natural order
        x8 = T.alloc_buffer((xr, k), "int8")  # the order the dot products consume
        prep(x, sx, xsum, xq, x8)
        if task_lanes > 0:  # tasks taken dynamically (int8_common: claimed tasks)
            claims = T.alloc_buffer((claim_words,), "uint32")  # one bit per task, on the stack
            for w in range(claim_words):
                claims[w] = T.uint32(0)
            for cl in T.parallel(task_lanes):
                acc0 = T.alloc_buffer((vecs, lanes), "int32", scope=acc_scope)
                acc1 = T.alloc_buffer((vecs * max(chains - 1, 1), lanes), "int32", scope=acc1_scope)
                yacc = T.alloc_buffer((vecs, lanes), "float32", scope=acc_scope)
                yup = T.alloc_buffer((vecs if swiglu else 1, lanes), "float32", scope=acc_scope)
                for j in range(ntask):
                    if unclaimed(claims, _lane_task(cl, j)):  # a plain read first: skip the lock when taken
                        if claim(claims, _lane_task(cl, j)):
                            run_task(x8, sx, xsum, weight, scale, sup, zero, weight_up, scale_up, sup_up, zero_up,
                                     expert_ids, y, acc0, acc1, yacc, yup, _lane_task(cl, j))
        else:
            for task in T.parallel(ntask):  # tile-major (int8_common: routed task order)
                # per-task tiles on the stack where they fit (kernels/scopes.py): the accumulators split
                # by chain so that two chains of 8 vectors stay under 1 KiB each
                acc0 = T.alloc_buffer((vecs, lanes), "int32", scope=acc_scope)  # chain 0
                acc1 = T.alloc_buffer((vecs * max(chains - 1, 1), lanes), "int32", scope=acc1_scope)  # chains 1..
                yacc = T.alloc_buffer((vecs, lanes), "float32", scope=acc_scope)
                yup = T.alloc_buffer((vecs if swiglu else 1, lanes), "float32", scope=acc_scope)  # SwiGLU: up's rows
                run_task(x8, sx, xsum, weight, scale, sup, zero, weight_up, scale_up, sup_up, zero_up,
                         expert_ids, y, acc0, acc1, yacc, yup, task)

    nt, zw = num_tiles(spec.rows, tile), zero_words(groups, bits)
    up, dq = spec.separate_up, sg > 0  # the SwiGLU form taking w3's arrays after w1's; double-quantized scales
    sdt, sup_shape = ("uint8", (experts, nt, (groups + sg - 1) // sg, tile)) if sg else ("float16", UNUSED)

    # the widest signature (double-quantized scales, w3's arrays), less what this variant does not take
    # (kernels/signature.py): gemv(x, weight, scale, (super_scale,) zero, (weight_up, scale_up, (super_scale_up,)
    # zero_up,) expert_ids, y); u8 scales are uint8 codes with fp16 super-scales
    @T.prim_func
    def gemv(x: T.Buffer((xr, k), "float32"), weight: T.Buffer((experts, nt, k * bits // 32, tile), "uint32"),
             scale: T.Buffer((experts, nt, groups, tile), sdt), super_scale: T.Buffer(sup_shape, "float16"),
             zero: T.Buffer((experts, nt, zw, tile), "uint32"),
             weight_up: T.Buffer((experts, nt, k * bits // 32, tile), "uint32"),
             scale_up: T.Buffer((experts, nt, groups, tile), sdt), super_scale_up: T.Buffer(sup_shape, "float16"),
             zero_up: T.Buffer((experts, nt, zw, tile), "uint32"),
             expert_ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
        T.func_attr({"global_symbol": "gemv", "tirx.noalias": True, "moec.row_guard": True, "moec.row_zero": True})
        body(x, weight, scale, super_scale if dq else None, zero, weight_up if up else weight,
             scale_up if up else scale, (super_scale_up if up else super_scale) if dq else None,
             zero_up if up else zero, expert_ids, y)

    return drop_params(gemv, ([] if dq else ["super_scale"]) + ([] if up else ["weight_up", "scale_up", "zero_up"]) +
                       ([] if dq and up else ["super_scale_up"]))
