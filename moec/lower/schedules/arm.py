"""64-bit ARM (NEON; dotprod when the target has it) schedules of the MoE kernels; every ARM tuning parameter lives here.

The float32-activation GEMV is the target-neutral ``gemv_definition`` scheduled for 128-bit NEON
registers (4 float32 lanes, 32 registers); the int8-activation GEMV (``arm_dotprod``) uses the
``sdot`` instruction of ARMv8.2-A's dotprod extension. None of the parameters below were tuned on
ARM hardware (none is reachable from this project's machines; timings under qemu say nothing about
real ARM speed): they are chosen from the register budget, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import tvm
from tvm import s_tir, tirx
from tvm.target import codegen

from moec.errors import MoecError
from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.grouped_gemm import GemmLoopParams


@dataclass(frozen=True)
class ArmParams:
    """Tuning parameters of the ARM schedules.

    Attributes
    ----------
    lanes : int
        Rows per vector: 4 float32 lanes of a 128-bit NEON register.
    tile_vectors : int
        Vectors of rows per parallel task (8: 32 rows, 8 accumulator registers of the 32, leaving
        room for the decoded codes and the broadcast activations).
    layout_tile : int
        Rows per tile of the kernel layout (``kernel_tile``): 16 rows, so one word of a tile is one
        64-byte cache line (the line size of Cortex-A76/A78).
    unroll_values : int
        Codes decoded per fully unrolled step (32: a whole number of words at every bit width).
    float_unroll : int
        K steps unrolled in the float-weight GEMV.
    gemm_tokens : int
        Tokens per register block in the grouped GEMM.
    int8_tile_vectors : int
        Vectors of 4 int32 rows per task in the dotprod GEMV.
    """

    lanes: int = 4
    tile_vectors: int = 8
    layout_tile: int = 16
    unroll_values: int = 32
    float_unroll: int = 4
    gemm_tokens: int = 4
    int8_tile_vectors: int = 8

    @property
    def tile_rows(self) -> int:
        """Rows per tile of the kernel layout (``to_kernel_layout(..., tile=...)``)."""
        return self.layout_tile


PARAMS = ArmParams()


def schedule_gemv(func: tirx.PrimFunc, spec: GemvSpec, params: ArmParams | None = None) -> tirx.PrimFunc:
    """Schedule a ``gemv_definition`` for NEON.

    Parallel over (routed expert, task of ``lanes * tile_vectors`` rows); within a task, per
    group, 32-code steps are decoded with constant shifts (unrolled) and accumulated into
    ``tile_vectors`` 4-lane accumulators (one output row per lane, x broadcast); the group's scale
    and zero point are applied once to the group sums.

    Parameters
    ----------
    func : tvm.tirx.PrimFunc
        From :func:`moec.lower.kernels.gemv.gemv_definition`.
    spec : GemvSpec
        What ``func`` was defined from.
    params : ArmParams | None
        Defaults to :data:`PARAMS`.

    Returns
    -------
    tvm.tirx.PrimFunc
    """
    params = params or PARAMS
    check_spec(spec, params)
    sch = s_tir.Schedule(func)
    if _has_block(sch, "h"):
        _schedule_swiglu(sch, params)
    if spec.quantized:
        _schedule_quantized(sch, gcd(params.unroll_values, spec.group_size), params)
    else:
        _schedule_float(sch, params)
    return sch.mod["main"]


def check_spec(spec: GemvSpec, params: ArmParams) -> None:
    """Raise :class:`MoecError` unless ``spec`` fits the ARM schedules' tile and vector."""
    if spec.tile != params.tile_rows:
        raise MoecError(f"kernel layout tile {spec.tile} does not match the ARM schedule's "
                        f"{params.tile_rows} rows (use kernel_tile(target))")
    if spec.rows % params.lanes:
        raise MoecError(f"ARM kernels need N ({spec.rows}) to be a multiple of {params.lanes} rows")


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return False
    return True


def _schedule_swiglu(sch: s_tir.Schedule, params: ArmParams) -> None:
    """``h = silu(gate) * up``: the exp stages inlined into one parallel 4-lane pass."""
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


def _split_rows(sch: s_tir.Schedule, loop, params: ArmParams):
    vectors, lane = sch.split(loop, [None, params.lanes])
    task, vec = sch.split(vectors, [None, params.tile_vectors])
    return task, vec, lane


def _schedule_quantized(sch: s_tir.Schedule, step_values: int, params: ArmParams) -> None:
    y, qdot = sch.get_sblock("y"), sch.get_sblock("qdot")
    j, n, g = sch.get_loops(y)
    task, vec, lane = _split_rows(sch, n, params)
    sch.reorder(j, task, g, vec, lane)
    sch.compute_at(qdot, g, preserve_unit_loops=True)
    sch.set_scope(qdot, 0, "local")
    _, q_vec, _, q_lane, q_i = sch.get_loops(qdot)[-5:]
    step, value = sch.split(q_i, [None, step_values])
    sch.reorder(step, value, q_vec, q_lane)
    sch.vectorize(q_lane)
    sch.unroll(q_vec)
    sch.unroll(value)
    sch.parallel(sch.fuse(j, task))
    sch.vectorize(lane)
    sch.unroll(vec)
    sch.decompose_reduction(qdot, step)
    sch.decompose_reduction(y, g)
    # The per-call O(K) work on x: xs vectorised; xsum as 4 partial sums per group (rfactor).
    r, c = sch.get_loops(sch.get_sblock("xs"))
    sch.vectorize(sch.split(sch.fuse(r, c), [None, params.lanes])[1])
    xsum = sch.get_sblock("xsum")
    i = sch.get_loops(xsum)[-1]
    if sch.get(i).extent.value % params.lanes == 0:
        partial = sch.rfactor(sch.split(i, [None, params.lanes])[1], 0)
        sch.vectorize(sch.get_loops(partial)[-1])


def _schedule_float(sch: s_tir.Schedule, params: ArmParams) -> None:
    y = sch.get_sblock("y")
    j, n, kk = sch.get_loops(y)
    task, vec, lane = _split_rows(sch, n, params)
    ko, ki = sch.split(kk, [None, params.float_unroll])
    sch.reorder(j, task, ko, ki, vec, lane)
    write_back = sch.cache_write(y, 0, "local")
    sch.reverse_compute_at(write_back, task)
    sch.vectorize(lane)
    sch.unroll(vec)
    sch.unroll(ki)
    wb = sch.fuse(*sch.get_loops(write_back)[2:])
    sch.vectorize(sch.split(wb, [None, params.lanes])[1])
    sch.parallel(sch.fuse(j, task))
    sch.decompose_reduction(y, ko)


def grouped_gemm_params(params: ArmParams | None = None) -> GemmLoopParams:
    """Loop parameters of the grouped GEMM on NEON (4-lane vectors, 4-token register blocks)."""
    params = params or PARAMS
    return GemmLoopParams(lanes=params.lanes, tokens=params.gemm_tokens, k_tile=32,
                          unroll=params.unroll_values)


def int8_gemv(spec: GemvSpec, target: tvm.target.Target, params: ArmParams | None = None) -> tirx.PrimFunc:
    """The int8-activation GEMV (``sdot``, see ``arm_dotprod``); a clear error without dotprod."""
    from moec.lower.schedules.arm_dotprod import DOTPROD_BITS, dotprod_gemv
    params = params or PARAMS
    check_spec(spec, params)
    if not codegen.target_has_features("dotprod", target):
        cpu = target.attrs.get("mcpu") or target.attrs.get("mtriple") or target.kind.name
        raise MoecError(f"int8 activations on ARM need the dotprod extension (mattr +dotprod, ARMv8.2-A "
                        f"and later); target {cpu} lacks it (use activations='float32')")
    if spec.bits not in DOTPROD_BITS:
        raise MoecError(f"no ARM int8-activation GEMV for {spec.bits}-bit weights; choices: "
                        f"{', '.join(map(str, DOTPROD_BITS))} (use activations='float32')")
    return dotprod_gemv(spec, params)
