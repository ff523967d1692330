"""The target-neutral CPU schedule of the decode GEMV, shared by the x86 and ARM families.

A family module (``x86``, ``arm``) owns its tuning choices in a subclass of
:class:`CpuScheduleParams` and calls :func:`schedule_gemv` with them; the recipe below is the
same on every SIMD CPU: parallel over (routed expert, task of ``lanes * tile_vectors`` rows),
``j`` major (the row guard of :mod:`moec.lower.kernels.row_guard` relies on it); within a task,
per group, steps of codes are decoded with constant shifts (unrolled) into ``tile_vectors``
vector accumulators (one output row per lane, x broadcast), and the group's scale and zero point
are applied once to the group sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import ClassVar

from tvm import s_tir, tirx

from moec.core.errors import MoecError
from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.grouped_gemm import GemmLoopParams


@dataclass(frozen=True)
class CpuScheduleParams:
    """The parameters every CPU family's schedule takes (a family subclass gives the values).

    Attributes
    ----------
    lanes : int
        float32 rows per vector register.
    tile_vectors : int
        Vectors of rows per parallel task.
    layout_tile : int
        Rows per tile of the kernel layout (``kernel_tile``).
    unroll_values : int
        Codes decoded per fully unrolled step; a smaller group size uses gcd(unroll_values, gs).
    float_unroll : int
        K steps unrolled in the float-weight GEMV.
    gemm_tokens : int
        Tokens per register block in the grouped GEMM.
    int8_tile_vectors : int
        ``tile_vectors`` of the family's int8-activation GEMV.
    row_multiple : int
        Rows every weight's N must be a multiple of (0: ``lanes``): one rule for a family whose kernels
        run on vectors of different widths, so a weight one kernel takes the others take too.
    nested_unroll_words : int
        Nibble words (8 codes each) per unrolled step of the nested GEMV's wider widths (the
        narrowest steps ``unroll_values`` codes as the fixed kernel). 4 makes every segment's
        shift a constant (a 1-bit plane word holds 4 nibble words' parts); 2 and 8 were no
        faster on x86 (one noisy A/B at load 12; 8 spills registers).
    """

    #: Name of the family in error messages (``x86``, ``ARM``).
    family: ClassVar[str] = "CPU"

    lanes: int
    tile_vectors: int
    layout_tile: int
    unroll_values: int
    float_unroll: int
    gemm_tokens: int
    int8_tile_vectors: int
    nested_unroll_words: int = 4
    code_tile: int = 0
    code_tile_bits: tuple[int, ...] = ()
    nested_int8_tile: int = 0
    row_multiple: int = 0

    def tile_for(self, rows: int, bits: int | None, activations: str) -> int:
        """Rows per tile of the kernel layout of a weight with ``rows`` output rows and ``bits``-bit codes
        (``None``: a nested stack; 16/32: float) whose kernels take ``activations`` (``"int8"`` or
        ``"float32"``) (``to_kernel_layout(..., tile=...)``): up to ``code_tile`` rows for int8
        activations at the widths in ``code_tile_bits`` (a nested stack under int8 activations: up to
        ``nested_int8_tile``, 0 for ``layout_tile``), else up to ``layout_tile``; the largest
        power-of-two divisor of ``rows`` up to that, so no tile is padded, or the limit itself (the
        last tile padded) when that divisor is below 16 rows."""
        if activations not in ("int8", "float32"):
            raise MoecError(f"internal: tile_for needs activations 'int8' or 'float32', not {activations!r}")
        if bits is None:  # a nested stack: ``nested_int8_tile`` (0: ``layout_tile``) under int8 activations
            limit = (self.nested_int8_tile or self.layout_tile) if activations == "int8" else self.layout_tile
        else:
            wide = self.code_tile and activations == "int8" and bits in self.code_tile_bits
            limit = self.code_tile if wide else self.layout_tile
        tile = gcd(rows, limit)
        return tile if tile >= 16 else limit


def check_spec(spec: GemvSpec, params: CpuScheduleParams, activations: str) -> None:
    """Raise :class:`MoecError` unless ``spec`` fits the layout tile and vector of the schedule for
    ``activations``."""
    bits = None if hasattr(spec, "storage_bits") else spec.bits  # a nested spec: its tile is the nested one
    want = params.tile_for(spec.n, bits, activations)
    if spec.tile != want:
        weight = "a nested stack" if bits is None else f"{bits}-bit codes"
        raise MoecError(f"kernel layout tile {spec.tile} does not match the {params.family} {activations} "
                        f"schedule's {want} rows for N = {spec.n} and {weight} "
                        f"(use kernel_tile(target, n, bits, activations))")
    if params.layout_tile % params.lanes and params.lanes % params.layout_tile:
        raise MoecError(f"layout tile {params.layout_tile} and vector {params.lanes} do not nest")
    unit = params.row_multiple or params.lanes
    if spec.rows % unit:
        raise MoecError(f"{params.family} kernels need N ({spec.rows}) to be a multiple of {unit} rows")


def schedule_gemv(func: tirx.PrimFunc, spec: GemvSpec, params: CpuScheduleParams) -> tirx.PrimFunc:
    """Schedule a ``gemv_definition`` for a SIMD CPU with ``params``.

    Parameters
    ----------
    func : tvm.tirx.PrimFunc
        From :func:`moec.lower.kernels.gemv.gemv_definition`.
    spec : GemvSpec
        What ``func`` was defined from (quantized or float form, group size, rows, tile).
    params : CpuScheduleParams
        The family's tuning parameters.

    Returns
    -------
    tvm.tirx.PrimFunc
    """
    check_spec(spec, params, "float32")
    sch = s_tir.Schedule(func)
    if _has_block(sch, "h"):
        _schedule_swiglu_epilogue(sch, params)
    if spec.quantized:
        _schedule_quantized_gemv(sch, gcd(params.unroll_values, spec.group_size), params)
    else:
        _schedule_float_gemv(sch, params)
    return sch.mod["main"]


def grouped_gemm_params(params: CpuScheduleParams) -> GemmLoopParams:
    """Loop parameters of the grouped GEMM (vector, token block, unroll step) from ``params``."""
    return GemmLoopParams(lanes=params.lanes, tokens=params.gemm_tokens, k_tile=32,
                          unroll=params.unroll_values)


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return False
    return True


def _schedule_swiglu_epilogue(sch: s_tir.Schedule, params: CpuScheduleParams) -> None:
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


def _tile_rows(sch: s_tir.Schedule, loop, params: CpuScheduleParams):
    """Split output rows into (task, vector, lane); a partial last task is cut at vectors."""
    vectors, lane = sch.split(loop, [None, params.lanes])
    tile, vec = sch.split(vectors, [None, params.tile_vectors])
    return tile, vec, lane


def _schedule_quantized_gemv(sch: s_tir.Schedule, step_values: int, params: CpuScheduleParams) -> None:
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
    sch.parallel(sch.fuse(j, tile))  # j major: the row guard wraps this loop
    sch.vectorize(lane)
    sch.unroll(vec)
    # Annotate before decomposing: vectorize needs the reduction blocks whole.
    sch.decompose_reduction(qdot, step)
    sch.decompose_reduction(y, g)
    _schedule_activation_prep(sch, params)


def _schedule_activation_prep(sch: s_tir.Schedule, params: CpuScheduleParams) -> None:
    """Vectorise the per-call O(K) work on x (``xs``, and ``xsum`` through an rfactor)."""
    r, c = sch.get_loops(sch.get_sblock("xs"))
    _, lane = sch.split(sch.fuse(r, c), [None, params.lanes])
    sch.vectorize(lane)
    _schedule_xsum(sch, params)


def _schedule_xsum(sch: s_tir.Schedule, params: CpuScheduleParams) -> None:
    xsum = sch.get_sblock("xsum")
    i = sch.get_loops(xsum)[-1]
    if sch.get(i).extent.value % params.lanes == 0:
        _, lane = sch.split(i, [None, params.lanes])
        partial = sch.rfactor(lane, 0)  # [.., lanes] partial sums, then one sum per group
        sch.vectorize(sch.get_loops(partial)[-1])


def _schedule_float_gemv(sch: s_tir.Schedule, params: CpuScheduleParams) -> None:
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
    wb = sch.fuse(*sch.get_loops(write_back)[2:])
    _, wb_lane = sch.split(wb, [None, params.lanes])
    sch.vectorize(wb_lane)
    sch.parallel(sch.fuse(j, tile))  # j major: the row guard wraps this loop
    sch.decompose_reduction(y, ko)


def schedule_nested_gemv(func: tirx.PrimFunc, spec, params: CpuScheduleParams) -> tirx.PrimFunc:
    """Schedule a ``nested_gemv_definition`` (``moec.lower.kernels.nested_gemv``) with ``params``.

    Parallel over (routed row, task of ``lanes * tile_vectors`` rows) as the quantized GEMV; inside
    a task, one whole loop nest per derived width ``d`` (block ``y{d}`` and its ``qdot{d}``, computed
    at the task), which ``guard_segments`` puts under the row's width test, then ``y`` takes the
    routed width's rows. Each nest is the quantized GEMV's recipe: per group, ``qdot{d}`` into
    ``tile_vectors`` vector accumulators, and the group's scale and zero point applied once to the
    group sums. The narrowest width steps ``unroll_values`` codes as the fixed kernel; the others
    step ``nested_unroll_words`` nibble words (unrolled), each word rebuilt once into registers
    (block ``word{d}`` computed at the word) and its 8 codes then multiplied in place, one
    unrolled step each.
    """
    check_spec(spec, params, "float32")
    sch = s_tir.Schedule(func)
    y = sch.get_sblock("y")
    j, n = sch.get_loops(y)
    tile, vec, lane = _tile_rows(sch, n, params)
    task = sch.fuse(j, tile)
    sch.parallel(task)  # j major: the row and segment guards wrap this loop
    sch.vectorize(lane)
    sch.unroll(vec)
    widths = len(spec.format.derived_bits)
    for d in range(widths):
        out, qdot = sch.get_sblock(f"y{d}"), sch.get_sblock(f"qdot{d}")
        sch.compute_at(out, task, preserve_unit_loops=True)
        _, o_n, g = sch.get_loops(out)[-3:]
        o_vec, o_lane = sch.split(o_n, [None, params.lanes])
        sch.reorder(g, o_vec, o_lane)
        sch.compute_at(qdot, g, preserve_unit_loops=True)
        # Left in global scope: a stack array inside the parallel task (<= 1 KB), which LLVM keeps
        # in registers. "local" scope made each accumulator and word buffer a
        # TVMBackendAllocWorkspace/FreeWorkspace pair per parallel task.
        if d == 0:  # the narrowest width: one reduction over codes, as the fixed kernel
            _, q_vec, _, q_lane, q_i = sch.get_loops(qdot)[-5:]
            codes = []
            per_step = params.unroll_values
        else:  # over rebuilt words, then over the codes of each word
            _, q_vec, _, q_lane, q_i, q_c = sch.get_loops(qdot)[-6:]
            codes = [q_c]
            per_step = params.nested_unroll_words
        step, value = sch.split(q_i, [None, gcd(per_step, sch.get(q_i).extent.value)])
        sch.reorder(step, value, *codes, q_vec, q_lane)
        sch.vectorize(q_lane)
        sch.unroll(q_vec)
        for loop in (value, *codes):
            sch.unroll(loop)
        if codes:  # the rebuilt words of this word step, in registers
            word = sch.get_sblock(f"word{d}")
            sch.compute_at(word, value, preserve_unit_loops=True)
            w_loops = sch.get_loops(word)
            w_loops = w_loops[1 + [sch.get(loop).same_as(sch.get(value)) for loop in w_loops].index(True):]
            sch.vectorize(w_loops[-1])
            for loop in w_loops[:-1]:
                sch.unroll(loop)
        sch.vectorize(o_lane)
        sch.unroll(o_vec)
        sch.decompose_reduction(qdot, step)
        sch.decompose_reduction(out, g)
    for name in ("xs_plane", "xs_nibble", "xs_byte"):
        if _has_block(sch, name):
            r, c = sch.get_loops(sch.get_sblock(name))
            _, lane = sch.split(sch.fuse(r, c), [None, params.lanes])
            sch.vectorize(lane)
    _schedule_xsum(sch, params)
    return sch.mod["main"]
