"""64-bit ARM (NEON; dotprod when the target has it) schedules of the MoE kernels; every ARM tuning parameter lives here.

The float32-activation GEMV is the target-neutral ``gemv_definition`` scheduled for 128-bit NEON
registers (4 float32 lanes, 32 registers); the int8-activation GEMV (``arm_dotprod``) uses the
``sdot`` instruction of ARMv8.2-A's dotprod extension. None of the parameters below were tuned on
ARM hardware (none is reachable from this project's machines; timings under qemu say nothing about
real ARM speed): they are chosen from the register budget, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import tvm
from tvm import tirx
from tvm.target import codegen

from moec.core.errors import MoecError
from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.grouped_gemm import GemmLoopParams
from moec.lower.schedules import cpu_gemv
from moec.lower.schedules.arm_dotprod import DOTPROD_BITS, dotprod_gemv
from moec.lower.schedules.arm_dotprod_nested import dotprod_nested_gemv
from moec.lower.schedules.cpu_gemv import CpuScheduleParams


@dataclass(frozen=True)
class ArmParams(CpuScheduleParams):
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
    int8_nested_tile_vectors : int
        Vectors of 4 int32 rows per task in the dotprod nested GEMV (``arm_dotprod_nested``): 4 (one
        16-row layout tile) keeps its 8 accumulators, a chunk's segment words and broadcast
        activations within the 32 registers.
    """

    family: ClassVar[str] = "ARM"

    lanes: int = 4
    tile_vectors: int = 8
    layout_tile: int = 16
    unroll_values: int = 32
    float_unroll: int = 4
    gemm_tokens: int = 4
    int8_tile_vectors: int = 8
    int8_nested_tile_vectors: int = 4


PARAMS = ArmParams()


def gemv_params(target: tvm.target.Target) -> ArmParams:
    """The parameters of the float32-activation GEMVs for ``target`` (one set on ARM)."""
    return PARAMS


def schedule_gemv(func: tirx.PrimFunc, spec: GemvSpec, params: ArmParams | None = None) -> tirx.PrimFunc:
    """Schedule a ``gemv_definition`` for NEON (:func:`moec.lower.schedules.cpu_gemv.schedule_gemv`).

    A task owns ``lanes * tile_vectors`` rows (4-lane accumulators); ``params`` defaults to
    :data:`PARAMS`.
    """
    return cpu_gemv.schedule_gemv(func, spec, params or PARAMS)


def grouped_gemm_params(params: ArmParams | None = None) -> GemmLoopParams:
    """Loop parameters of the grouped GEMM on NEON (4-lane vectors, 4-token register blocks)."""
    return cpu_gemv.grouped_gemm_params(params or PARAMS)


def _require_dotprod(target: tvm.target.Target) -> None:
    if not codegen.target_has_features("dotprod", target):
        cpu = target.attrs.get("mcpu") or target.attrs.get("mtriple") or target.kind.name
        raise MoecError(f"int8 activations on ARM need the dotprod extension (mattr +dotprod, ARMv8.2-A "
                        f"and later); target {cpu} lacks it (use activations='float32')")


def int8_gemv(spec: GemvSpec, target: tvm.target.Target, params: ArmParams | None = None) -> tirx.PrimFunc:
    """The int8-activation GEMV (``sdot``, see ``arm_dotprod``); a clear error without dotprod."""
    params = params or PARAMS
    cpu_gemv.check_spec(spec, params, "int8")
    _require_dotprod(target)
    if spec.bits not in DOTPROD_BITS:
        raise MoecError(f"no ARM int8-activation GEMV for {spec.bits}-bit weights; choices: "
                        f"{', '.join(map(str, DOTPROD_BITS))} (use activations='float32')")
    return dotprod_gemv(spec, params)


def schedule_nested_gemv(func: tirx.PrimFunc, spec, params=None) -> tirx.PrimFunc:
    """Schedule a nested (run-time width) GEMV with this family's parameters (``cpu_gemv``)."""
    return cpu_gemv.schedule_nested_gemv(func, spec, params or PARAMS)


def int8_nested_gemv(spec, target: tvm.target.Target, params: ArmParams | None = None) -> tirx.PrimFunc:
    """The int8-activation nested GEMV (``sdot``, see ``arm_dotprod_nested``); a clear error without dotprod."""
    params = params or PARAMS
    cpu_gemv.check_spec(spec, params, "int8")
    _require_dotprod(target)
    return dotprod_nested_gemv(spec, params)
