"""What the explicit int8-activation GEMVs (x86 VNNI, ARM dotprod) share: activation prep, code masks, group scaling.

Both kernels quantize ``x`` per group to int8 (:func:`moec.lower.kernels.activations.quantize_activations`:
scale ``max|x| / 127``, round, per-group code sum), store the codes in the order their
dot-product instruction consumes them, and scale each group's integer sum once; only that order,
the vector width and the dot instruction differ per ISA (they stay in ``x86_vnni`` / ``arm_dotprod``).

Routed task order (these GEMVs and ``x86_vnni_nested``): parallel task ``task`` is routed row
``task % top_k`` and row tile ``task // top_k`` (tile-major). TVM hands each thread a contiguous
range of a parallel loop's tasks; row-major (``task // tiles``) gave thread 0 rows 0..top_k/2-1 and
the other thread the rest, so in a mixed plan, where a bit class' call has only the routed experts
of that class (the other rows are -1 and do no work, :mod:`moec.lower.kernels.row_guard`), or in a
nested bundle, where rows cost their run-time width, one thread could get all the work. Tile-major,
each thread gets the same share of every routed row's tiles whichever rows are routed.

Claimed tasks (the x86 VNNI GEMV, ``X86Params.int8_claim_lanes``): an even share of tasks is not an
even share of time. Two threads reading DRAM do not progress evenly, and with TVM's static split they
finished a call 1-43 % of it apart (cycle stamps per task, 2026-12-03), the early one waiting at the
join. So that GEMV's parallel loop runs ``int8_claim_lanes`` lanes (TVM splits the lanes over its
threads); each lane scans every task from its own start, wrapping around, and runs the tasks whose bit
it sets first in a per-call bitmap (``lock bts``, ``llvm.x86.atomic.bts.rm``; apache-tvm 0.27's CPU
backend has no atomic add), so a thread that is ahead takes the tasks the other has not reached. A
task's output does not depend on which thread runs it (bit-identical to the static split, tested).
Calls with fewer tasks than lanes keep the static split. The nested VNNI GEMV (``x86_vnni_nested``) claims
its tasks the same way (:func:`claim_lanes`, :func:`lane_task`, :func:`unclaimed`, :func:`claim`).

Claim order (``X86Params.int8_expert_major_claims``): a lane claims in expert-major order (claim ``c`` is
routed row ``c // tiles``, row tile ``c % tiles``), so the tasks one thread runs back to back are the
consecutive row tiles of one expert, and each of the task's code streams (one per layout tile, or per
nested segment) continues where the previous task's ended instead of starting cold in another expert's
block. Tile-major claims made every task a new stream per segment; the hardware prefetcher lost them
most on short rows (K = 1024) and on the nested kernel's 3-4 streams a tile.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from collections.abc import Callable
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from moec.lower.kernels.decode import code_at

#: Per bit width, the uint32 mask keeping one code per byte after shifting plane ``t`` down.
BYTE_MASK = {2: 0x03030303, 4: 0x0F0F0F0F, 8: 0xFFFFFFFF}


def plane_slot_source(bits: int) -> Callable[[int], int]:
    """For a word of ``32/bits`` plane-packed codes, the code index whose activation sits in slot ``c``.

    Plane ``t`` holds codes ``m*P + t`` (``P = 8/bits``) in byte ``m``, and its dot product
    takes the four activations of slots ``4t .. 4t+3``.
    """
    planes = 8 // bits
    return lambda c: c % 4 * planes + c // 4


def quantize_group(gs: int, vl: int):
    """A TVMScript macro ``group(x, r, g, sx, xsum, xq, qr)``: activations ``x[r, g*gs : (g+1)*gs]`` to int8.

    ``sx[r, g]`` = max|x| / 127 of the group, ``xq[qr, g*gs + i]`` the rounded codes and ``xsum[r, g]``
    their sum (vectorised over ``vl`` lanes). The one definition behind both preps below, so a
    prefill row is quantized exactly as the decode GEMV quantizes that token.
    """
    @T.macro
    def group(x, r, g, sx, xsum, xq, qr):
        amax = T.alloc_buffer((vl,), "float32", scope="local")
        isum = T.alloc_buffer((vl,), "int32", scope="local")
        for lane in T.vectorized(vl):
            amax[lane] = T.float32(0)
            isum[lane] = 0
        for i in range(gs // vl):
            for lane in T.vectorized(vl):
                amax[lane] = T.max(amax[lane], T.abs(x[r, g * gs + i * vl + lane]))
        for lane in range(1, vl):
            amax[0] = T.max(amax[0], amax[lane])
        sx[r, g] = T.max(amax[0], T.float32(1e-30)) / T.float32(127)
        for i in range(gs // vl):
            for lane in T.vectorized(vl):
                xq[qr, g * gs + i * vl + lane] = T.Cast("int8", T.round(x[r, g * gs + i * vl + lane] / sx[r, g]))
                isum[lane] = isum[lane] + T.Cast("int32", xq[qr, g * gs + i * vl + lane])
        for lane in range(1, vl):
            isum[0] = isum[0] + isum[lane]
        xsum[r, g] = isum[0]

    return group


def quantize_activations_prep(xr: int, k: int, gs: int, vl: int, step_codes: int,
                              slot_source: Callable[[int], int]):
    """A TVMScript macro ``prep(x, sx, xsum, xq, x8)`` filling the int8 activations of one call.

    Per row ``r < xr`` and group of ``gs`` values (vectorised over ``vl`` lanes; this O(K) work
    runs on one thread before the parallel part): ``sx`` the group scale, ``xq`` the codes in
    natural order, ``xsum`` their sum; then ``x8`` holds, per step of ``step_codes`` codes, slot
    ``c`` = ``xq`` of code ``slot_source(c)``.
    """
    group = quantize_group(gs, vl)

    @T.macro
    def prep(x, sx, xsum, xq, x8):
        for r, g in T.grid(xr, k // gs):
            group(x, r, g, sx, xsum, xq, r)
        for r, c in T.grid(xr, k // step_codes):
            for slot in T.unroll(step_codes):
                x8[r, c * step_codes + slot] = xq[r, c * step_codes + slot_source(slot)]

    return prep


def scaled_group_sum(dot, scale, zero, sx, xsum, e, t, col, g, r, bits: int, recentre: int = 0,
                     super_scale=None, super_groups: int = 0):
    """``scale * sx * (sum q*x8 - zero * sum x8)`` of group ``g`` for column ``col`` of tile ``t``.

    ``dot`` is the group's int32 sum of codes times int8 activations of row ``r``; ``recentre``
    is subtracted from the zero point when the kernel recentred its codes (signed-byte dots).
    With ``super_scale`` (double-quantized ``u8`` scales) ``scale`` holds uint8 codes and the
    group's scale is ``code * super_scale[e, t, g // super_groups, col]``.
    """
    zq = T.Cast("int32", code_at(lambda word: zero[e, t, word, col], g, bits))
    if recentre:
        zq = zq - recentre
    s = T.Cast("float32", scale[e, t, g, col])
    if super_scale is not None:
        s = s * T.Cast("float32", super_scale[e, t, g // super_groups, col])
    return s * sx[r, g] * T.Cast("float32", dot - zq * xsum[r, g])


def quantize_rows_prep(k: int, gs: int, vl: int, step_codes: int, slot_source: Callable[[int], int]):
    """A TVMScript macro ``prep(x, rows, sx, xsum, x8)``: :func:`quantize_activations_prep` for a
    symbolic number of rows, in parallel over rows (the grouped GEMM's prologue)."""
    group = quantize_group(gs, vl)

    @T.macro
    def prep(x, rows, sx, xsum, x8):
        for r in T.parallel(rows):
            xq = T.alloc_buffer((1, k), "int8", scope="local")
            for g in range(k // gs):
                group(x, r, g, sx, xsum, xq, 0)
            for c in range(k // step_codes):
                for slot in T.unroll(step_codes):
                    x8[r, c * step_codes + slot] = xq[0, c * step_codes + slot_source(slot)]

    return prep


def claim_lanes(ntask: int, lanes: int) -> int:
    """Lanes of a claimed-task loop over ``ntask`` tasks: ``lanes``, or 0 (TVM's static split) when there are
    fewer tasks than lanes (the small GEMVs of a small model, where claiming measured no gain)."""
    return lanes if lanes > 0 and ntask >= lanes else 0


def lane_task(cl, j, ntask: int, lanes: int, tiles: int = 0):
    """The ``j``-th task claim lane ``cl`` looks at: lanes start evenly spaced and wrap around. With ``tiles``
    (row tiles per routed row) the claims run expert-major: claim ``c`` is task ``c % tiles * top_k + c // tiles``
    of the tile-major numbering (routed row ``c // tiles``, tile ``c % tiles``; a bijection, so every task is
    still claimed once)."""
    c = (cl * ntask // max(lanes, 1) + j) % ntask
    return c % tiles * (ntask // tiles) + c // tiles if tiles else c


def unclaimed(claims, task):
    """True when ``task``'s bit in ``claims`` reads 0 (a plain load: it may be stale, :func:`claim` decides)."""
    return (claims[task // 32] >> T.Cast("uint32", task % 32)) & T.uint32(1) == T.uint32(0)


def claim(claims, task):
    """Set ``task``'s bit with ``lock bts`` (x86); true when this call set it (the task is this lane's to run)."""
    return T.call_llvm_intrin("int8", "llvm.x86.atomic.bts.rm.i32", T.address_of(claims[task // 32]),
                              T.Cast("uint32", task % 32)) == T.int8(0)


@dataclass(frozen=True)
class DotIsa:
    """What the int8-activation GEMVs written on a 4-byte dot need of an ISA (``int8_nested``; x86: ``x86_vnni``).

    Attributes
    ----------
    lanes : int
        int32 rows per vector (16: AVX-512, 8: AVX2, 4: NEON).
    dot : callable
        ``dot(acc, codes, x4)``: ``acc`` int32 x lanes plus, per lane, the sum of the 4 byte
        products of ``codes`` (uint32 x lanes, 4 code bytes a lane) and ``x4`` (int8 x 4·lanes).
    select : callable
        ``select(a, b, mask)``: ``(a & mask) | (b & ~mask)`` (uint32 x lanes, ``mask`` an int).
    unsigned_codes : bool
        The dot reads the code bytes as unsigned (``vpdpbusd``): odd nibble lanes are masked in
        place and 8-bit codes taken as stored. False (``sdot``, AVX2): odd lanes shifted down, 8-bit
        codes recentred.
    claim_lanes : int
        Lanes of the nested GEMV's claimed-task loop (``int8_common``, x86 ``lock bts``); 0: TVM's static
        split. (The fixed x86 GEMV takes its own from ``X86Params.int8_claim_lanes``.)
    expert_major_claims : bool
        The nested GEMV's claims in expert-major order (:func:`lane_task`; the fixed x86 GEMV: from
        ``X86Params.int8_expert_major_claims``).
    nibble_down : callable or None
        ``nibble_down(word, mask)``: ``(word >> 4) & mask`` byte by byte (``mask`` a 32-bit pattern within the low
        nibble of each byte) in one instruction (x86 GFNI: :func:`gfni_nibble_down`); None: a shift and an and.
    pairs, quads : callable or None
        An ISA whose dot is two steps (AVX2: ``vpmaddubsw`` then ``vpmaddwd``) exposes them, so a kernel
        can add several first steps in int16 before one second step: ``pairs(codes, x4)`` the int16 x
        2·lanes sums of adjacent byte products (code bytes 0..15: a pair is at most ``2·15·127 = 3810``,
        so 8 of them add up exactly in int16), ``quads(p, weight)`` int32 x lanes, ``weight`` times the
        sum of adjacent int16 lanes of ``p``. None where the dot is one instruction.
    """

    lanes: int
    dot: Callable
    select: Callable
    unsigned_codes: bool
    claim_lanes: int = 0
    expert_major_claims: bool = False
    nibble_down: Callable | None = None
    pairs: Callable | None = None
    quads: Callable | None = None

    def high_nibbles(self, word, mask: int, plain: bool = False):
        """``(word >> 4) & mask`` per byte: each byte's high nibble moved down (``mask`` picks its bits);
        ``plain``: as a shift and an and even where :attr:`nibble_down` exists."""
        if self.nibble_down is not None and not plain:
            return self.nibble_down(word, mask)
        return (word >> splat(4, self.lanes)) & splat(mask, self.lanes)


def splat(value: int, lanes: int, dtype: str = "uint32"):
    return T.Broadcast(tirx.const(value, dtype), lanes)


def plain_select(lanes: int) -> Callable:
    """``select`` as plain TIR (``(a & m) | (b & ~m)``), which any LLVM target compiles."""
    return lambda a, b, mask: (a & splat(mask, lanes)) | (b & splat(~mask & 0xFFFFFFFF, lanes))


def nibble_down_matrix(mask: int) -> int:
    """The 8x8 bit matrix (a uint64, row ``7 − i`` in byte ``7 − i``) for which ``gf2p8affineqb`` computes
    ``(byte >> 4) & (mask & 0xF)`` in every byte: output bit ``i`` (``i < 4``, set in ``mask``) is input bit ``i + 4``,
    the other output bits have empty rows (0)."""
    return sum((1 << (i + 4)) << (8 * (7 - i)) for i in range(4) if mask >> i & 1)


def gfni_nibble_down(lanes: int) -> Callable:
    """:attr:`DotIsa.nibble_down` on x86 GFNI: one ``vgf2p8affineqb`` (512-bit for 16 lanes, VEX 256-bit for 8)
    with :func:`nibble_down_matrix`; ``mask`` must repeat one low-nibble byte pattern (every byte the same)."""
    def nibble_down(word, mask: int):
        byte = mask & 0xFF
        if mask != byte * 0x01010101 or byte > 0xF:
            raise ValueError(f"internal: nibble_down mask {mask:#x} is not one low-nibble byte repeated")
        size = 4 * lanes
        matrix = T.reinterpret(f"int8x{size}", T.Broadcast(tirx.const(nibble_down_matrix(byte), "uint64"), lanes // 2))
        out = T.call_llvm_pure_intrin(f"int8x{size}", f"llvm.x86.vgf2p8affineqb.{8 * size}",
                                      T.reinterpret(f"int8x{size}", word), matrix, T.int8(0))
        return T.reinterpret(f"uint32x{lanes}", out)
    return nibble_down
