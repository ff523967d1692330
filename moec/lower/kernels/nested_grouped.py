"""Prefill grouped GEMM over a nested expert stack: tokens sorted by expert, each expert at its run-time width.

This is the float32-activation kernel (ARM, ``--activations float32``); with int8 activations x86 runs
:mod:`moec.lower.schedules.int8_nested_gemm` on the same stack.

The nested counterpart of :mod:`moec.lower.kernels.grouped_gemm` (same loops, same
``GemmLoopParams`` from the target family: x86 and ARM), reading the nested stack of
:func:`moec.lower.kernels.layout.nested_kernel_layout` (the decode GEMV's arrays, shared in the
bundle) and the same run-time table ``prec`` (int32 ``[E]``) as
:mod:`moec.lower.kernels.nested_gemv`. A task is one layout tile of an expert; per quantization group
and vector of rows of the tile, the group's weights are dequantized once into a local ``[group, lanes]``
buffer at the expert's width
``k = prec[e]`` and reused by every token routed to the expert. The dequantization has one code path
per derived width, under ``if prec[e] == k`` outside its loop, reading only the segments ``k``
needs (:mod:`moec.lower.kernels.nested_layout` says where each code's part is)::

    w = scale · (t_k − (zero − (2**(B−k) − 1) / 2)),   t_k = (q >> (B−k)) << (B−k)

``t_k`` being the needed segments' parts or-ed at their bit positions: the width-``k`` weight of
:mod:`moec.quant.nested` exactly (``B`` the storage width). Experts without tokens cost nothing.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from dataclasses import dataclass
from math import gcd

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.core.formats import NestedFormat, get_nested_format
from moec.lower.kernels.decode import code_at
from moec.lower.kernels.grouped_gemm import GemmLoopParams, token_blocks
from moec.lower.kernels.layout import num_tiles, zero_words
from moec.lower.kernels.nested_layout import nibble_of, nibble_word
from moec.lower.kernels.signature import UNUSED, drop_params, segment_names
from moec.quant.nested import segment_positions


@dataclass(frozen=True)
class NestedGroupedSpec:
    """Shape of one nested grouped GEMM (``n``, ``k``, ``group_size``, ``num_stacked``, ``tile`` as in
    :class:`~moec.lower.kernels.grouped_gemm.GroupedGemmSpec`; ``storage_bits`` a key of ``NESTED_FORMATS``)."""

    storage_bits: int
    n: int
    k: int
    group_size: int
    num_stacked: int
    tile: int

    def __post_init__(self) -> None:
        fmt = get_nested_format(self.storage_bits)
        if self.n < 1 or self.k < 1 or self.num_stacked < 1 or self.tile < 1:
            raise MoecError(f"bad nested kernel shape n={self.n} k={self.k} experts={self.num_stacked} "
                            f"tile={self.tile}")
        positions = segment_positions(fmt)
        if any(4 % w or p // 4 != (p + w - 1) // 4 for w, p in zip(fmt.segment_bits, positions)) or fmt.storage_bits % 4:
            raise MoecError(f"{fmt.name}: nibble-lane segments must be 1, 2 or 4 bits wide, each within one "
                            f"nibble of the stored code")
        if self.group_size < 1 or self.k % self.group_size or self.group_size % 32:
            raise MoecError(f"nested kernels need group_size ({self.group_size}) to divide K ({self.k}) and "
                            f"be a multiple of 32 (every 1-bit plane of a group fills whole uint32 words)")

    @property
    def format(self) -> NestedFormat:
        return get_nested_format(self.storage_bits)


def _u32(value: int):
    return tirx.const(value, "uint32")


def nested_grouped_definition(spec: NestedGroupedSpec, params: GemmLoopParams) -> tirx.PrimFunc:
    """``y[t] = x[t] @ W_{prec[e]}[e].T`` for ``offsets[e] <= t < offsets[e+1]``, in explicit TIR loops.

    Parameters, in order: ``x`` float32 ``[T, K]`` (``T`` symbolic: the routed tokens sorted by
    expert), one ``seg{s}`` uint32 ``[E, NT, K*w_s/32, tile]`` per segment, ``scale`` float16
    ``[E, NT, G, tile]``, ``zero`` uint32 ``[E, NT, ZW, tile]`` (storage-width codes), ``prec`` int32
    ``[E]``, ``offsets`` int32 ``[E + 1]``, ``y`` float32 ``[T, N]``. A width ``prec`` does not
    serve computes nothing meaningful (the session refuses such plans before they reach a kernel).
    """
    fmt = spec.format
    bits, widths, seg_bits, positions = spec.storage_bits, fmt.derived_bits, fmt.segment_bits, segment_positions(fmt)
    lanes, n, k, tile, gs = params.lanes, spec.n, spec.k, spec.tile, spec.group_size
    if tile % lanes or n % lanes:
        raise MoecError(f"the grouped GEMM needs N ({n}) and the tile ({tile}) to be multiples "
                        f"of {lanes} rows")
    nb, nt, per_tile = n // lanes, num_tiles(n, tile), tile // lanes
    experts, tb = spec.num_stacked, params.tokens
    groups, unroll = k // gs, gcd(params.unroll, gs)
    zw = zero_words(groups, bits)
    nd = len(widths)

    def nibbles(segs, e, t, r, g, a, d, nib):
        """Nibble ``nib`` (0: bits 0-3 of the stored code) of nibble word ``a``'s 8 codes, one per 4-bit lane,
        rebuilt from the needed segments (0..d) that lie in it; None if none does."""
        word = None
        for s in range(d + 1):
            width = seg_bits[s]
            if positions[s] // 4 != nib:
                continue
            w_at, shift = nibble_word(a, width)
            raw = segs[s][e, t, g * (gs * width // 32) + w_at, r]
            part = ((raw >> shift.astype("uint32")) & _u32(((1 << width) - 1) * 0x11111111)) \
                << _u32(positions[s] - 4 * nib)
            word = part if word is None else word | part
        return word

    def dequant(segs, scale, zero, e, t, v, g, i, lane, d):
        """Weight of row ``lane`` of vector ``v`` of tile ``t``, column ``g*gs + i`` at width ``widths[d]`` (segments 0..d only).

        The code's nibble word is rebuilt from the needed segments (8 codes at once, one per lane: the
        expression is the same for the 8 codes of a nibble word, so the compiler computes it once) and
        the code's lane taken out of it: ``t_k``, the truncated code at its bit positions. With both
        nibbles (8 bits), the two nibble words are interleaved into two byte words first (4 codes each).
        """
        r = v * lanes + lane
        a, code_lane = nibble_of(i)
        parts = [nibbles(segs, e, t, r, g, a, d, nib) for nib in range(bits // 4)]
        if len(parts) == 2 and parts[0] is not None:
            low, high = parts
            even = ((high & _u32(0x0F0F0F0F)) << _u32(4)) | (low & _u32(0x0F0F0F0F))   # lanes 0, 2, 4, 6
            odd = (high & _u32(0xF0F0F0F0)) | ((low >> _u32(4)) & _u32(0x0F0F0F0F))   # lanes 1, 3, 5, 7
            byte = (tirx.Select(code_lane % 2 == 0, even, odd) >> (8 * (code_lane // 2)).astype("uint32"))
            code = byte & _u32(0xFF)
        else:
            nib = len(parts) - 1  # the only nibble a width up to 4 bits reads: the top one
            code = ((parts[nib] >> (4 * code_lane).astype("uint32")) & _u32(0xF)) << _u32(4 * nib)
        zq = code_at(lambda w: zero[e, t, w, r], g, bits).astype("float32")
        centre = tirx.const(((1 << (bits - widths[d])) - 1) / 2, "float32")
        return (code.astype("float32") - (zq - centre)) * scale[e, t, g, r].astype("float32")

    @T.macro
    def fill(wd, segs, scale, zero, e, t, v, g, d):
        for i0 in range(gs // unroll):
            for i1 in T.unroll(unroll):
                for lane in T.vectorized(lanes):
                    wd[i0 * unroll + i1, lane] = dequant(segs, scale, zero, e, t, v, g, i0 * unroll + i1, lane, d)

    add_tokens = token_blocks(gs, tb, lanes)

    @T.macro
    def body(x, y, segs, scale, zero, prec, offsets):
        # a task is one layout tile of an expert, its ``per_tile`` vectors one after another within each group,
        # so it reads the tile's rows of every segment word together (a task per vector read a quarter of each
        # 256-byte row of a 64-row tile: 1.39-1.51x the 16-row time at 8 and 2 bits, against 1.06-1.56x)
        for task in T.parallel(experts * nt):
            wd = T.alloc_buffer((gs, lanes), "float32", scope="local")
            acc = T.alloc_buffer((tb, lanes), "float32", scope="local")
            start: T.int32 = offsets[task // nt]
            count: T.int32 = offsets[task // nt + 1] - start
            if count > 0:
                width: T.int32 = prec[task // nt]
                for g in range(groups):
                    for v in range(per_tile):
                        if task % nt * per_tile + v < nb:  # the last tile's padding rows: none
                            # one specialised dequantization per width; the segments it skips are never read
                            if width == widths[0]:
                                fill(wd, segs, scale, zero, task // nt, task % nt, v, g, 0)
                            if nd > 1:
                                if width == widths[1]:
                                    fill(wd, segs, scale, zero, task // nt, task % nt, v, g, 1)
                            if nd > 2:
                                if width == widths[2]:
                                    fill(wd, segs, scale, zero, task // nt, task % nt, v, g, 2)
                            if nd > 3:
                                if width == widths[3]:
                                    fill(wd, segs, scale, zero, task // nt, task % nt, v, g, 3)
                            add_tokens(x, y, wd, acc, start, count, g, (task % nt * per_tile + v) * lanes)

    cols = [k * w // 32 for w in seg_bits]
    if nd > 4 or nd < 3:
        raise MoecError(f"{fmt.name}: the nested grouped GEMM serves 3 or 4 derived widths, not {nd}")

    def seg_shape(s):
        return (experts, nt, cols[s], tile) if s < nd else UNUSED

    # the widest signature (4 segments), less a segment this format does not have (kernels/signature.py)
    @T.prim_func
    def nested_grouped(x_h: T.handle, seg0: T.Buffer(seg_shape(0), "uint32"), seg1: T.Buffer(seg_shape(1), "uint32"),
                       seg2: T.Buffer(seg_shape(2), "uint32"), seg3: T.Buffer(seg_shape(3), "uint32"),
                       scale: T.Buffer((experts, nt, groups, tile), "float16"),
                       zero: T.Buffer((experts, nt, zw, tile), "uint32"), prec: T.Buffer((experts,), "int32"),
                       offsets: T.Buffer((experts + 1,), "int32"), y_h: T.handle):
        T.func_attr({"global_symbol": "grouped_gemm", "tirx.noalias": True})
        tokens = T.int32()
        x = T.match_buffer(x_h, (tokens, k), "float32")
        y = T.match_buffer(y_h, (tokens, n), "float32")
        body(x, y, [seg0, seg1, seg2, seg3][:nd], scale, zero, prec, offsets)

    return drop_params(nested_grouped, segment_names(nd))
