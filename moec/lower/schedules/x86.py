"""x86 (AVX-512 / AVX2) schedules of the MoE kernels; every x86 tuning parameter lives here."""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import tvm
from tvm import s_tir, tirx
from tvm.target import codegen

from moec.errors import MoecError
from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.grouped_gemm import GemmLoopParams
from moec.lower.schedules.x86_vnni import vnni_gemv


@dataclass(frozen=True)
class X86Params:
    """Tuning parameters of the x86 schedules.

    Attributes
    ----------
    lanes : int
        Rows per vector: 16 float32 lanes of an AVX-512 register (two AVX2 registers).
    tile_vectors : int
        Vectors of rows per parallel task: a thread owns ``lanes * tile_vectors`` output rows
        (64), so ``tile_vectors`` accumulators stay in registers and share each broadcast of x.
    layout_tile : int
        Rows per tile of the kernel layout (``kernel_tile``). 16 = one vector: a task then
        reads ``tile_vectors`` concurrent streams, which measured about 1.4x the cold bandwidth
        of one 64-row stream at 2 bits on the 2-core x86 VM (more misses in flight).
    unroll_values : int
        Codes decoded per fully unrolled step (32: a whole number of words at every bit width,
        so all shifts and word offsets are constants); a smaller group size uses gcd(32, gs).
    float_unroll : int
        K steps unrolled in the float GEMV.
    gemm_tokens : int
        Tokens per register block in the grouped GEMM.
    int8_tile_vectors : int
        ``tile_vectors`` of the int8 (VNNI) GEMV: 8 concurrent row streams per thread measured
        ~10% more cold bandwidth at 2-3 bits than 4 (its compute leaves more room).
    int8_chains : int
        Independent int32 accumulators per vector in the VNNI GEMV, so consecutive ``vpdpbusd``
        do not wait on each other's latency.
    prefetch_words : int
        Software prefetch distance of the VNNI GEMV in words of each row stream (0: none); 8
        measured ~5-10% more cold bandwidth than none; farther, non-temporal, or also
        prefetching the scale stream did not help.
    prefetch_locality : int
        ``llvm.prefetch`` locality (3 = prefetcht0, 0 = prefetchnta).

    """

    lanes: int = 16
    tile_vectors: int = 4
    layout_tile: int = 16
    unroll_values: int = 32
    float_unroll: int = 8
    gemm_tokens: int = 4
    int8_tile_vectors: int = 8
    int8_chains: int = 2
    prefetch_words: int = 8
    prefetch_locality: int = 3

    @property
    def tile_rows(self) -> int:
        """Rows per tile of the kernel layout (``to_kernel_layout(..., tile=...)``)."""
        return self.layout_tile


PARAMS = X86Params()


def schedule_gemv(func: tirx.PrimFunc, spec: GemvSpec, params: X86Params | None = None) -> tirx.PrimFunc:
    """Schedule a ``gemv_definition`` for x86.

    Parallel over (routed expert, tile of ``lanes * tile_vectors`` rows); inside a tile, per
    group: the codes of a 32-value step are decoded with constant shifts (unrolled), converted and
    multiplied into ``tile_vectors`` vector accumulators (rows in lanes, x broadcast), then the
    group's scale and zero point are applied once to the group sums.

    Parameters
    ----------
    func : tvm.tirx.PrimFunc
        From :func:`moec.lower.kernels.gemv.gemv_definition`.
    spec : GemvSpec
        What ``func`` was defined from (quantized or float form, group size, rows, tile).
    params : X86Params | None
        Defaults to :data:`PARAMS`.

    Returns
    -------
    tvm.tirx.PrimFunc
    """
    params = params or PARAMS
    _check_spec(spec, params)
    sch = s_tir.Schedule(func)
    swiglu = _has_block(sch, "h")
    if swiglu:
        _schedule_swiglu_epilogue(sch, params)
    if spec.quantized:
        _schedule_quantized_gemv(sch, gcd(params.unroll_values, spec.group_size), params)
    else:
        _schedule_float_gemv(sch, params)
    return sch.mod["main"]


def _check_spec(spec: GemvSpec, params: X86Params) -> None:
    if spec.tile != params.tile_rows:
        raise MoecError(f"kernel layout tile {spec.tile} does not match the x86 schedule's "
                        f"{params.tile_rows} rows (use kernel_tile(target))")
    if params.layout_tile % params.lanes and params.lanes % params.layout_tile:
        raise MoecError(f"layout tile {params.layout_tile} and vector {params.lanes} do not nest")
    if spec.rows % params.lanes:
        raise MoecError(f"x86 kernels need N ({spec.rows}) to be a multiple of {params.lanes} rows")


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return False
    return True


def _schedule_swiglu_epilogue(sch: s_tir.Schedule, params: X86Params) -> None:
    """``h = silu(gate) * up``: the exp stages inlined, one vectorised parallel pass."""
    h = sch.get_sblock("h")
    for block in sch.get_producers(h):
        if sch.get(block).name_hint != "y":
            for inner in sch.get_producers(block):
                if sch.get(inner).name_hint != "y":
                    sch.compute_inline(inner)
            sch.compute_inline(block)
    j, c = sch.get_loops(h)
    outer, lane = sch.split(sch.fuse(j, c), [None, params.lanes])
    sch.parallel(outer)
    sch.vectorize(lane)


def _tile_rows(sch: s_tir.Schedule, loop, params: X86Params):
    """Split output rows into (tile, vector, lane); a partial last tile is cut at vectors."""
    vectors, lane = sch.split(loop, [None, params.lanes])
    tile, vec = sch.split(vectors, [None, params.tile_vectors])
    return tile, vec, lane


def _schedule_quantized_gemv(sch: s_tir.Schedule, step_values: int, params: X86Params) -> None:
    y, qdot = sch.get_sblock("y"), sch.get_sblock("qdot")
    j, n, g = sch.get_loops(y)
    tile, vec, lane = _tile_rows(sch, n, params)
    sch.reorder(j, tile, g, vec, lane)
    # Unit loops kept, so the regenerated nest is always (expert, vector, group, lane, value).
    sch.compute_at(qdot, g, preserve_unit_loops=True)
    sch.set_scope(qdot, 0, "local")
    _, q_vec, _, q_lane, q_i = sch.get_loops(qdot)[-5:]
    step, value = sch.split(q_i, [None, step_values])
    sch.reorder(step, value, q_vec, q_lane)
    sch.vectorize(q_lane)
    sch.unroll(q_vec)
    sch.unroll(value)
    sch.parallel(sch.fuse(j, tile))
    sch.vectorize(lane)
    sch.unroll(vec)
    # Annotate before decomposing: vectorize needs the reduction blocks whole.
    sch.decompose_reduction(qdot, step)
    sch.decompose_reduction(y, g)
    _schedule_activation_prep(sch, params)


def _schedule_activation_prep(sch: s_tir.Schedule, params: X86Params) -> None:
    """Vectorise the per-call O(K) work on x (``xs``, and ``xsum`` through an rfactor)."""
    r, c = sch.get_loops(sch.get_sblock("xs"))
    _, lane = sch.split(sch.fuse(r, c), [None, params.lanes])
    sch.vectorize(lane)
    xsum = sch.get_sblock("xsum")
    i = sch.get_loops(xsum)[-1]
    extent = sch.get(i).extent.value
    if extent % params.lanes == 0:
        _, lane = sch.split(i, [None, params.lanes])
        partial = sch.rfactor(lane, 0)  # [.., lanes] partial sums, then one 16-way sum per group
        sch.vectorize(sch.get_loops(partial)[-1])


def _schedule_float_gemv(sch: s_tir.Schedule, params: X86Params) -> None:
    y = sch.get_sblock("y")
    j, n, kk = sch.get_loops(y)
    tile, vec, lane = _tile_rows(sch, n, params)
    ko, ki = sch.split(kk, [None, params.float_unroll])
    sch.reorder(j, tile, ko, ki, vec, lane)
    write_back = sch.cache_write(y, 0, "local")
    sch.reverse_compute_at(write_back, tile)
    sch.vectorize(lane)
    sch.unroll(vec)
    sch.unroll(ki)
    wb_loops = sch.get_loops(write_back)
    wb_vec = sch.fuse(*wb_loops[2:])
    _, wb_lane = sch.split(wb_vec, [None, params.lanes])
    sch.vectorize(wb_lane)
    sch.parallel(sch.fuse(j, tile))
    sch.decompose_reduction(y, ko)


def grouped_gemm_params(params: X86Params | None = None) -> GemmLoopParams:
    """Loop parameters of the grouped GEMM on x86 (vector, token block, unroll step)."""
    params = params or PARAMS
    return GemmLoopParams(lanes=params.lanes, tokens=params.gemm_tokens, k_tile=32,
                          unroll=params.unroll_values)


def int8_gemv(spec: GemvSpec, target: tvm.target.Target,
              params: X86Params | None = None) -> tirx.PrimFunc:
    """The int8-activation GEMV (AVX-512 VNNI, see ``x86_vnni``); a clear error without VNNI."""
    _check_spec(spec, params or PARAMS)
    needed = ["avx512vnni"] + (["avx512vbmi"] if spec.bits == 3 else [])  # vpmultishiftqb
    missing = [f for f in needed if not codegen.target_has_features(f, target)]
    if missing:
        raise MoecError(f"{spec.bits}-bit int8 activations need {', '.join(needed)}; target "
                        f"{target} lacks {', '.join(missing)} (use activations='float32')")
    return vnni_gemv(spec, params or PARAMS)
