"""CPU schedules of the Relax-level reference ops (those not replaced by moec's kernels).

The GEMV-shaped ones -- MLA's per-head ``k_up``/``v_up`` projections, the decode attention
scores -- get :class:`InnerReductionGemv` instead of dlight's CPU ``GEMV`` rule. For a reduction
over the contiguous axis of the weight (``y[s] = sum_r w[s, r] * x[r]``) dlight's rule (apache-tvm
0.27) vectorizes the *output* axis with up to 128 lanes, so every lane gathers a different row,
and fully unrolls up to 64 reduction steps below that: one 128 x 64 = 8192-load basic block per
function. LLVM's code generation is superlinear in it; the DeepSeek-V2-Lite-shaped ``k_up``
(16 heads x 512 x 128) sat in it for more than ten minutes. The tiny test configs never showed
it (their rows are a few dozen lanes). :class:`InnerReductionGemv` vectorizes the reduction axis
instead (contiguous loads, ``rfactor`` into ``lanes`` partial sums, one horizontal sum per output):
code size is bounded by ``lanes``, whatever the shapes.

dlight's ``Reduction`` rule (softmax and other row reductions) is kept; :class:`ParallelRows` shares a
prefill's element-wise functions out over the pool.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.analysis.gemv import is_gemv, normalize
from tvm.s_tir.dlight.base import get_extent, try_inline, try_inline_contiguous_spatial
from tvm.target.codegen import llvm_get_vector_width


def vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    """Lanes of ``dtype_bits`` in one SIMD register of ``target`` (4 if LLVM does not say)."""
    bits = llvm_get_vector_width(target)
    return max(bits // dtype_bits, 1) if bits > 0 else 4


def reduction_lanes(extent: int, lanes: int) -> int:
    """The largest power of two that divides ``extent`` and is at most ``lanes`` (1: scalar)."""
    width = 1
    while width * 2 <= lanes and extent % (width * 2) == 0:
        width *= 2
    return width


class InnerReductionGemv(dl.ScheduleRule):
    """A GEMV whose reduction runs along the weight's contiguous axis, optionally with an injective
    epilogue: parallel over the (batch, output) pairs, each a ``lanes``-wide vector of partial sums
    over contiguous reduction steps (``rfactor``), then one horizontal sum.

    ``lanes`` is the target's SIMD width in float32 lanes, reduced to a power of two that divides the
    reduction extent; a symbolic reduction extent stays a scalar loop.
    """

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None or len(infos) not in (1, 2):
            return None
        info, epilogue = infos[0], infos[1] if len(infos) == 2 else None
        if epilogue is not None and not epilogue.is_injective():
            return None
        if len(info.iters) not in (2, 3) or is_gemv(sch, info) is None:
            return None
        if normalize(sch, info) is not True:  # None: not a GEMV after all; False: outer reduction
            return None
        block = info.block_rv
        batch, s, r, c = sch.get_loops(block)
        r = sch.fuse(r, c)
        extent = get_extent(sch, r)
        spatial = sch.fuse(batch, s)
        lanes = reduction_lanes(extent, vector_lanes(target)) if isinstance(extent, int) else 1
        partial = None
        if lanes > 1:
            _, r_in = sch.split(r, [None, lanes])
            rank = len(sch.get(block).writes[0].source.shape)
            partial = sch.rfactor(r_in, factor_axis=rank)  # the output's shape + [lanes], lanes contiguous
            spatial, _, r_in = sch.get_loops(partial)
            sch.vectorize(r_in)
            sch.reverse_compute_at(block, spatial)
        sch.parallel(spatial)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue.block_rv, spatial)
        if partial is not None:  # zero the partial sums once, before the reduction loop
            sch.decompose_reduction(partial, sch.get_loops(partial)[1])
        return sch


class ParallelRows(dl.ScheduleRule):
    """An injective function over a prompt's rows (a symbolic extent: a prefill's adds, multiplies,
    RoPE, transposes, gathers, cache copies), shared out over TVM's pool. Static loops outside the
    first symbolic one with ``min_tasks`` or more iterations in all (a transpose's heads x dims) are
    the parallel loop; otherwise those loops and the symbolic one are fused and split into tasks of
    at least ``chunk`` elements. Loops further in stay as they were, so the index arithmetic per
    element does not grow (a fully fused transpose divided per element: 8x slower). Unscheduled,
    these ran on one thread whatever the pool (1.5 of a 512-token prefill's 29 ms on the reference
    model). A function whose extents are all static (a decode step's: one token) is left alone, so
    decode launches nothing new.
    """

    def __init__(self, chunk: int = 2048, min_tasks: int = 8) -> None:
        self.chunk, self.min_tasks = chunk, min_tasks

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline(sch, normalize_prim_func(sch) or [])
        if len(infos) != 1 or not infos[0].is_injective():
            return None
        loops = sch.get_loops(infos[0].block_rv)
        extents = [get_extent(sch, loop) for loop in loops]
        first = next((i for i, e in enumerate(extents) if not isinstance(e, int)), None)
        if first is None:  # static: not a prompt's rows
            return None
        outside = 1
        for e in extents[:first]:
            outside *= e
        if outside >= self.min_tasks:
            sch.parallel(sch.fuse(*loops[:first]) if first > 1 else loops[0])
            return sch
        inner = 1
        for e in extents[first + 1:]:
            inner = inner * e if isinstance(e, int) and isinstance(inner, int) else None
        outer = sch.fuse(*loops[:first + 1]) if first else loops[0]
        per = -(-self.chunk // inner) if inner else 1
        if per > 1:
            outer, _ = sch.split(outer, [None, per])
        sch.parallel(outer)
        return sch


def cpu_rules() -> list[dl.ScheduleRule]:
    """The rules in the order they are tried: the GEMV above, dlight's CPU reductions, then a prompt's
    injective functions (:class:`ParallelRows`)."""
    return [InnerReductionGemv(), dl.cpu.Reduction(), ParallelRows()]
