"""Prefill grouped GEMM over nested (any-precision) expert stacks with int8 activations, on any 4-byte dot ISA.

The int8-activation counterpart of :mod:`moec.lower.kernels.nested_grouped` (same stack, same run-time
table ``prec``, same ``offsets``) and the nested counterpart of the fixed int8 grouped GEMM
(:mod:`moec.lower.schedules.x86_vnni_gemm`), whose loops it shares: every row of ``x`` is quantized once
per call in the nested GEMV's slot order (:func:`moec.lower.schedules.int8_nested.slot_source`), ``rows``
gathers the quantized rows of the sorted pairs, tasks are split as the fixed kernel's (``gemm_split``).

A task (``vecs`` vectors of rows of one expert, a whole layout tile: 128 rows on AVX-512, 32 on AVX2) first
rebuilds its codes at the expert's run-time width ``k = prec[e]`` into a byte workspace, once per call,
reading only the segments ``k`` needs (:func:`~moec.lower.schedules.int8_nested.byte_words`, one loop nest
per width): each byte ``q_k << (4 − k)`` up to 4 bits (odd nibble lanes shifted down, so every byte is a
value 0..15), the stored code at 8 (recentred to ``q − 128`` on signed-code ISAs: AVX2). Then its tokens
run the fixed kernel's unpacked inner loop (one dot per 4 code bytes, vector and token:
:func:`~moec.lower.schedules.x86_vnni_gemm.unpacked_group_dots`; on a two-step dot, AVX2, widths up to 4
bits add four words' int16 pair sums before one widening), and
each group's integer sum is scaled by the nested GEMV's group term
(:func:`~moec.lower.schedules.int8_nested.nested_group_term`). So a token's output row equals the int8
nested GEMV's for that token and width bit for bit (same codes, same integer sums, same term), and at
the stored width the fixed int8 kernels'.

The rebuild costs about one token's decode work per task and the workspace ``vecs · K`` bytes a row
(256 KiB at K = 2048 on AVX-512), written once and read once per block of ``tb`` tokens. Every expert with tokens
unpacks, however few: rebuilding the codes per block of tokens in registers instead (as the fixed kernel
extracts its packed codes) was slower at every token count measured (OLMoE-shaped projection, 8-bit
storage, ``benchmarks/nested_gemm.py``: at 8 bits 12.6 against 4.2 ms for a 16-token prompt, whose experts
get 2 tokens each; at 2 bits 3.4–4.3 against 2.3 ms), the rebuild's temporaries and 16 accumulators
not fitting the registers. The unpacked loop dots every vector of a task unguarded (a partial last
task's padding vectors are zeros in the workspace, never stored): a guard per vector made LLVM store
every accumulator after each dot (2-bit 256-token prompt 16.5 → 9.4 ms).
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.layout import num_tiles, zero_words
from moec.lower.kernels.nested_grouped import NestedGroupedSpec
from moec.lower.kernels.signature import UNUSED, drop_params, segment_names
from moec.lower.schedules.int8_common import DotIsa, quantize_rows_prep
from moec.lower.schedules.int8_nested import byte_words, nested_group_term, segment_chunk_loader, slot_source
from moec.lower.schedules.x86_vnni_gemm import split_tasks, token_block_loop, unpacked_group_dots


def int8_nested_grouped_gemm(spec: NestedGroupedSpec, params, isa: DotIsa) -> tirx.PrimFunc:
    """``y[p] = x[rows[p]] @ W_{prec[e]}[e].T`` for ``offsets[e] <= p < offsets[e+1]``, int8 activations.

    Parameters, in order: ``x`` float32 ``[R, K]``, ``rows`` int32 ``[P]`` (the row of ``x`` of each sorted
    pair), one ``seg{s}`` uint32 ``[E, NT, K*w_s/32, tile]`` per segment, ``scale`` float16 ``[E, NT, G, tile]``,
    ``zero`` uint32 ``[E, NT, ZW, tile]``, ``prec`` int32 ``[E]``, ``offsets`` int32 ``[E + 1]``, ``y`` float32
    ``[P, N]``. ``params``: the family's parameters (``nested_gemm_block``, ``gemm_split``; their ``lanes`` are
    ``isa``'s). A width ``prec`` does not serve computes the widest (the session refuses such plans).
    """
    fmt, bits, widths = spec.format, spec.storage_bits, spec.format.derived_bits
    n, k, gs, tile, experts, lanes = spec.n, spec.k, spec.group_size, spec.tile, spec.num_stacked, isa.lanes
    if params.lanes != lanes or tile % lanes or n % lanes:
        raise MoecError(f"the int8 nested grouped GEMM needs {lanes}-row vectors dividing N ({n}) and the "
                        f"tile ({tile})")
    if len(widths) not in (3, 4):
        raise MoecError(f"{fmt.name}: the int8 nested grouped GEMM serves 3 or 4 widths, not {len(widths)}")
    groups, chunks, nb, nseg = k // gs, gs // 32, n // lanes, len(fmt.segment_bits)
    vecs, tb = params.nested_gemm_block(tile)
    tiles = -(-nb // vecs)
    split = max(1, min(params.gemm_split, tiles))  # as the fixed kernel (split_tasks)
    per_split = -(-tiles // split)
    nt, zw = num_tiles(n, tile), zero_words(groups, bits)
    prep = quantize_rows_prep(k, gs, 16, 32, slot_source)  # (group_size: a multiple of 32, NestedGroupedSpec)
    # per width: one dot per word; on two-step dots (AVX2) widths up to 4 bits (code bytes 0..15) add 4 words'
    # first steps in int16 before one second step
    pair_words = 4 if isa.pairs is not None and (gs // 4) % 4 == 0 else 0
    group_dots = [unpacked_group_dots(isa, vecs, tb, nb, gs, guarded=False,
                                      pair_words=pair_words if widths[d] <= 4 else 0) for d in range(len(widths))]

    def code_word(segs, e, gv, g, ch, d, a: int, half: int):
        """Word ``2a + half`` of chunk ``ch``: nibble word ``a``'s even (``half`` 0) or odd lanes at width ``d``,
        one value a byte (the activations of x8 slots ``8a + 4·half ..``, :func:`slot_source`)."""
        load = segment_chunk_loader(segs, fmt, gs, lanes, tile, e, gv, g, ch)
        return byte_words(isa, fmt, d, load, a, odd_in_place=False)[half]

    def make_unpack(d):
        @T.macro
        def unpack(ws, segs, e, gv0):
            """The task's codes at width ``d`` into ``ws`` (word ``w`` of a row: codes of activations 4w..4w+3)."""
            for v in T.unroll(vecs):
                if gv0 + v < nb:
                    for g in range(groups):
                        for ch in range(chunks):
                            # the two halves of a nibble word are consecutive statements: one rebuild
                            ws[v, (g * chunks + ch) * 8 + 0, T.ramp(0, 1, lanes)] = code_word(segs, e, gv0 + v, g, ch, d, 0, 0)
                            ws[v, (g * chunks + ch) * 8 + 1, T.ramp(0, 1, lanes)] = code_word(segs, e, gv0 + v, g, ch, d, 0, 1)
                            ws[v, (g * chunks + ch) * 8 + 2, T.ramp(0, 1, lanes)] = code_word(segs, e, gv0 + v, g, ch, d, 1, 0)
                            ws[v, (g * chunks + ch) * 8 + 3, T.ramp(0, 1, lanes)] = code_word(segs, e, gv0 + v, g, ch, d, 1, 1)
                            ws[v, (g * chunks + ch) * 8 + 4, T.ramp(0, 1, lanes)] = code_word(segs, e, gv0 + v, g, ch, d, 2, 0)
                            ws[v, (g * chunks + ch) * 8 + 5, T.ramp(0, 1, lanes)] = code_word(segs, e, gv0 + v, g, ch, d, 2, 1)
                            ws[v, (g * chunks + ch) * 8 + 6, T.ramp(0, 1, lanes)] = code_word(segs, e, gv0 + v, g, ch, d, 3, 0)
                            ws[v, (g * chunks + ch) * 8 + 7, T.ramp(0, 1, lanes)] = code_word(segs, e, gv0 + v, g, ch, d, 3, 1)
                else:  # the padding vectors of a last, partial task: dotted (unguarded loop), never stored
                    for word in range(k // 4):
                        ws[v, word, T.ramp(0, 1, lanes)] = T.Broadcast(T.uint32(0), lanes)
        return unpack

    def make_term(d):
        def term(dot, scale, zero, sx, xsum, e, gv, g, lane, row, _sup):
            return nested_group_term(isa, bits, widths[d], dot, scale, zero, sx, xsum, e, gv * lanes // tile,
                                     gv * lanes % tile + lane, g, row, recentred=not isa.unsigned_codes)
        return term

    unpacks = [make_unpack(d) for d in range(len(widths))]
    runs = [token_block_loop(vecs, tb, nb, lanes, groups, group_dots[d], make_term(d)) for d in range(len(widths))]
    four = len(widths) == 4
    w = list(widths)

    @T.macro
    def run_task(rows, segs, scale, _sup, zero, y, sx, xsum, x8, acc, yacc, tok, gv0, e, start, count, prec):
        if count > 0:  # experts without tokens cost nothing
            ws = T.alloc_buffer((vecs, k // 4, lanes), "uint32")
            if prec[e] == w[0]:
                unpacks[0](ws, segs, e, gv0)
                runs[0](rows, None, scale, None, zero, y, sx, xsum, x8, acc, yacc, tok, ws, gv0, e, start, count)
            elif prec[e] == w[1]:
                unpacks[1](ws, segs, e, gv0)
                runs[1](rows, None, scale, None, zero, y, sx, xsum, x8, acc, yacc, tok, ws, gv0, e, start, count)
            elif four and prec[e] == w[2]:
                unpacks[2](ws, segs, e, gv0)
                runs[2](rows, None, scale, None, zero, y, sx, xsum, x8, acc, yacc, tok, ws, gv0, e, start, count)
            else:  # the widest (the session refuses widths the format does not serve)
                unpacks[-1](ws, segs, e, gv0)
                runs[-1](rows, None, scale, None, zero, y, sx, xsum, x8, acc, yacc, tok, ws, gv0, e, start, count)

    body = split_tasks(split, experts, per_split, tiles, (vecs, tb), lanes, k, groups, prep, run_task)

    cols = [k * b // 32 for b in fmt.segment_bits]
    if nseg not in (3, 4):
        raise MoecError(f"{fmt.name}: the int8 nested grouped GEMM takes 3 or 4 segments, not {nseg}")

    def seg_shape(s):
        return (experts, nt, cols[s], tile) if s < nseg else UNUSED

    # the widest signature (4 segments), less a segment this format does not have (kernels/signature.py)
    @T.prim_func
    def grouped_gemm(x_h: T.handle, rows_h: T.handle, seg0: T.Buffer(seg_shape(0), "uint32"),
                     seg1: T.Buffer(seg_shape(1), "uint32"), seg2: T.Buffer(seg_shape(2), "uint32"),
                     seg3: T.Buffer(seg_shape(3), "uint32"), scale: T.Buffer((experts, nt, groups, tile), "float16"),
                     zero: T.Buffer((experts, nt, zw, tile), "uint32"), prec: T.Buffer((experts,), "int32"),
                     offsets: T.Buffer((experts + 1,), "int32"), y_h: T.handle):
        T.func_attr({"global_symbol": "grouped_gemm", "tirx.noalias": True})
        xrows = T.int32()
        pairs = T.int32()
        x = T.match_buffer(x_h, (xrows, k), "float32")
        rows = T.match_buffer(rows_h, (pairs,), "int32")
        y = T.match_buffer(y_h, (pairs, n), "float32")
        body(x, rows, xrows, [seg0, seg1, seg2, seg3][:nseg], scale, None, zero, offsets, y, prec)

    return drop_params(grouped_gemm, segment_names(nseg))
