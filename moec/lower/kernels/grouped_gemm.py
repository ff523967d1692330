"""TIR definition of the prefill grouped GEMM: tokens sorted by expert, one bit class per kernel."""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.


from dataclasses import dataclass
from math import gcd

from tvm import tirx
from tvm.script import tirx as T

from moec.lower.kernels.decode import code_at, extract
from moec.lower.kernels.layout import KERNEL_BITS, check_kernel_shape, num_tiles, zero_words
from moec.lower.kernels.signature import UNUSED, drop_params
from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_SCALES, get_scale_format


@dataclass(frozen=True)
class GroupedGemmSpec:
    """Shape of one grouped GEMM (one bit class); fields as in :class:`~moec.lower.kernels.gemv.GemvSpec`."""

    bits: int
    n: int
    k: int
    group_size: int
    num_stacked: int
    tile: int
    scales: str = DEFAULT_SCALES

    def __post_init__(self) -> None:
        check_kernel_shape(self.bits, self.n, self.k, self.group_size)
        get_scale_format(self.scales)
        if self.num_stacked < 1:
            raise MoecError(f"num_stacked must be >= 1, got {self.num_stacked}")

    @property
    def quantized(self) -> bool:
        return self.bits in KERNEL_BITS

    @property
    def super_groups(self) -> int:
        """Groups per super-scale of ``u8`` scales (0: fp16 scales)."""
        return get_scale_format(self.scales).super_groups if self.quantized else 0


@dataclass(frozen=True)
class GemmLoopParams:
    """Loop structure the target family asks of the grouped GEMM.

    Attributes
    ----------
    lanes : int
        Rows per vector (and per parallel task); divides the tile, and ``n`` must be a multiple.
    tokens : int
        Tokens per register block (rows of accumulators sharing each weight vector).
    k_tile : int
        K values per dequantized weight tile for float weights (quantized weights use a group).
    unroll : int
        Codes decoded per unrolled step (gcd with the group size is used).
    """

    lanes: int
    tokens: int
    k_tile: int = 32
    unroll: int = 32


def token_blocks(kt: int, tb: int, lanes: int):
    """The macro adding one K tile's part of a vector's outputs for every token routed to its expert:
    ``run(x, y, wd, acc, start, count, g, col)``, ``wd`` the tile's dequantized weights ``[kt, lanes]``,
    the tokens ``start .. start + count`` taken ``tb`` at a time into ``acc`` (``[tb, lanes]``), added into
    ``y[:, col .. col + lanes]`` (set at the first tile, ``g == 0``). Shared by the fixed and nested
    grouped GEMMs."""

    @T.macro
    def run(x, y, wd, acc, start, count, g, col):
        for blk in range((count + tb - 1) // tb):
            for r in T.unroll(tb):
                for lane in T.vectorized(lanes):
                    acc[r, lane] = T.float32(0)
            for i in range(kt):
                for r in T.unroll(tb):
                    for lane in T.vectorized(lanes):
                        # Tail rows of a block recompute the last token (never stored).
                        acc[r, lane] = acc[r, lane] + wd[i, lane] * x[
                            start + T.min(blk * tb + r, count - 1), g * kt + i]
            for r in T.unroll(tb):
                if blk * tb + r < count:
                    for lane in T.vectorized(lanes):
                        y[start + blk * tb + r, col + lane] = T.if_then_else(
                            g == 0, T.float32(0), y[start + blk * tb + r, col + lane]) + acc[r, lane]

    return run


def grouped_gemm_definition(spec: GroupedGemmSpec, params: GemmLoopParams) -> tirx.PrimFunc:
    """``y[t] = x[t] @ W[e].T`` for ``offsets[e] <= t < offsets[e+1]``, in explicit TIR loops.

    Parallel over (expert, vector of ``lanes`` rows); per K tile (a quantization group) the
    vector's weights are dequantized once into a local ``[k_tile, lanes]`` float buffer, reused
    by every token of the expert, ``params.tokens`` tokens at a time. Experts with no tokens
    cost nothing. The parameters are those of :func:`moec.lower.kernels.factory.make_grouped_gemm`
    (``u8`` scales: ``scale`` uint8 codes, then ``super_scale`` float16 ``[E, NT, ceil(G/8), T]``).
    """
    bits, lanes, n, k, tile = spec.bits, params.lanes, spec.n, spec.k, spec.tile
    if tile % lanes or n % lanes:
        raise MoecError(f"the grouped GEMM needs N ({n}) and the tile ({tile}) to be multiples "
                        f"of {lanes} rows")
    nb, nt, per_tile = n // lanes, num_tiles(n, tile), tile // lanes
    experts, tb = spec.num_stacked, params.tokens
    if spec.quantized:
        kt, groups, unroll = spec.group_size, k // spec.group_size, gcd(params.unroll, spec.group_size)
        words_per_group, w_cols = kt * bits // 32, k * bits // 32
        zw = zero_words(groups, bits)
    else:
        kt = params.k_tile if k % params.k_tile == 0 else k
        groups, unroll, w_cols = k // kt, 1, k
    w_dtype = "uint32" if spec.quantized else ("float16" if bits == 16 else "float32")
    sg = spec.super_groups
    sgroups = -(-k // spec.group_size // sg) if sg else 0

    def dequant(weight, scale, zero, e, b, g, i, lane, sup=None):
        """Weight of row ``b*lanes + lane``, column ``g*kt + i`` (tile and column in the tile)."""
        t, r = b // per_tile, b % per_tile * lanes + lane
        if not spec.quantized:
            return weight[e, t, g * kt + i, r].astype("float32")
        shift = (i * bits) % 32
        code = extract(lambda word: weight[e, t, word, r], g * words_per_group + (i * bits) // 32,
                       shift, bits, straddle=shift > 32 - bits)
        zq = code_at(lambda word: zero[e, t, word, r], g, bits)
        s = scale[e, t, g, r].astype("float32")
        if sup is not None:
            s = s * sup[e, t, g // sg, r].astype("float32")
        return (code.astype("float32") - zq.astype("float32")) * s

    add_tokens = token_blocks(kt, tb, lanes)

    @T.macro
    def body(x, y, weight, scale, zero, offsets, sup):
        for task in T.parallel(experts * nb):
            wd = T.alloc_buffer((kt, lanes), "float32", scope="local")
            acc = T.alloc_buffer((tb, lanes), "float32", scope="local")
            start: T.int32 = offsets[task // nb]
            count: T.int32 = offsets[task // nb + 1] - start
            if count > 0:
                for g in range(groups):
                    for i0 in range(kt // unroll):
                        for i1 in T.unroll(unroll):
                            for lane in T.vectorized(lanes):
                                wd[i0 * unroll + i1, lane] = dequant(
                                    weight, scale, zero, task // nb, task % nb, g, i0 * unroll + i1, lane, sup)
                    add_tokens(x, y, wd, acc, start, count, g, task % nb * lanes)

    q, dq = spec.quantized, spec.quantized and sg > 0  # codes with scales and zeros; double-quantized scales
    scale_shape, zero_shape = ((experts, nt, groups, tile), (experts, nt, zw, tile)) if q else (UNUSED, UNUSED)
    sdt, sup_shape = ("uint8", (experts, nt, sgroups, tile)) if dq else ("float16", UNUSED)

    # the widest signature, less what this variant does not take (kernels/signature.py): float weights have
    # no scales or zeros, fp16 scales no super-scales
    @T.prim_func
    def grouped_gemm(x_h: T.handle, weight: T.Buffer((experts, nt, w_cols, tile), w_dtype),
                     scale: T.Buffer(scale_shape, sdt), super_scale: T.Buffer(sup_shape, "float16"),
                     zero: T.Buffer(zero_shape, "uint32"), offsets: T.Buffer((experts + 1,), "int32"), y_h: T.handle):
        T.func_attr({"global_symbol": "grouped_gemm", "tirx.noalias": True})
        tokens = T.int32()
        x = T.match_buffer(x_h, (tokens, k), "float32")
        y = T.match_buffer(y_h, (tokens, n), "float32")
        body(x, y, weight, scale if q else None, zero if q else None, offsets, super_scale if dq else None)

    return drop_params(grouped_gemm, ([] if dq else ["super_scale"]) + ([] if q else ["scale", "zero"]))
