"""GPU (CUDA) schedules of the Relax-level kernels: dlight's GPU rules, each result checked before it is kept.

dlight's GPU ``Reduction`` rule in apache-tvm 0.27 can return a schedule that later fails to
lower (e.g. for the attention-scores reduction with a fused elementwise producer: "Cross-thread
reduction requires all the reduction-related loops to be the deepest"), and its ``LowBatchGEMV``
rule, given the decode attention scores over a cache of symbolic length ``P`` (a one-token
"GEMV" with ``P`` output rows), caches whole output rows in thread-local buffers of ``P``-dependent
size, which CUDA code generation refuses ("Can only handle constant size stack allocation").
``Checked`` runs the cross-thread-reduction lowering on each candidate and checks that every
thread-local buffer has a constant size; if either fails (or the rule itself raises, as dlight's
GEMV analysis does on indirectly indexed buffers), the next rule (finally ``Fallback``, which
only binds threads) schedules the function instead.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir
from tvm.s_tir import dlight as dl

log = logging.getLogger(__name__)


class Checked(dl.ScheduleRule):
    """``rule``, except that a schedule the cross-thread-reduction lowering rejects counts as no match."""

    def __init__(self, rule: dl.ScheduleRule) -> None:
        self.rule = rule

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        try:
            space = self.rule.apply(func, target, tunable)
        except Exception as exc:  # noqa: BLE001 - e.g. dlight's GEMV analysis asserts on indirect indexing
            log.debug("%s failed: %s", type(self.rule).__name__, exc)
            return None
        if space is None:
            return None
        for sch in space if isinstance(space, list) else [space]:
            dynamic = dynamic_local_buffers(sch)
            if dynamic:
                log.debug("%s rejected: thread-local buffer(s) of runtime size %s", type(self.rule).__name__,
                          ", ".join(dynamic))
                return None
            try:
                s_tir.transform.LowerCrossThreadReduction()(tvm.IRModule({"main": sch.mod["main"]}))
            except Exception as exc:  # noqa: BLE001 - TVM raises a generic error
                log.debug("%s rejected for %s: %s", type(self.rule).__name__,
                          func.attrs.get("global_symbol", "?") if func.attrs else "?",
                          str(exc).strip().splitlines()[0])
                return None
        return space


def dynamic_local_buffers(sch: s_tir.Schedule) -> list[str]:
    """Names of the thread-local (``local`` scope) buffers of ``sch``'s function whose shape is not constant."""
    out, todo = [], [sch.mod["main"].body.block]
    while todo:
        block = todo.pop()
        out += [b.name for b in block.alloc_buffers
                if b.scope() == "local" and not all(isinstance(d, tvm.tirx.IntImm) for d in b.shape)]
        try:
            todo += [sch.get(child) for child in sch.get_child_blocks(sch.get_sblock(block.name_hint))]
        except Exception:  # noqa: BLE001 - a block name that is not unique: its children are not reachable by name
            pass
    return out


class FusedGemv(dl.ScheduleRule):
    """moec's fused dequantize-GEMVs (``gpu_linear``: a ``gemv`` block over (row j, output n, k),
    optionally fed by a ``dequant`` block): one warp per output row, each thread a run of
    ``vector`` consecutive k per step, ``rows`` rows per thread block.

    With ``stage``, each step first copies the thread's run of the activations (float4 loads) and of the
    weight codes that every call reads (a fixed stack's ``packed`` codes, a nested stack's top segment
    ``seg0``; widths dividing 8, runs of 4, 8 or 16 bytes) into registers with one vector load each,
    instead of one scalar load per element. A nested stack's lower segments stay scalar loads under
    their width test, so a narrow width still skips their bytes.

    dlight's rules miss the routed-expert form (the expert index is read from ``expert_ids``,
    which makes it opaque to their pattern analysis) and would leave it to ``Fallback`` (one
    thread per output, a serial loop over K).
    """

    #: k per thread per step by the stack's code width (nested: its storage width), measured on an H200
    #: (``benchmarks/gpu_gemv_variants.py``, 32 experts of [4096, 4096]): 8 at 2 and 3 bits and for nested
    #: stacks (an activation run of two float4 loads), 4 at 4 and 8 bits (8-bit: one 4-byte code load).
    VECTORS = {2: 8, 3: 8, 4: 4, 8: 4, "nested": 8}

    def __init__(self, threads: int = 32, vector: int | None = None, rows: int = 4, stage: bool = True) -> None:
        self.threads, self.vector, self.rows, self.stage = threads, vector, rows, stage

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if not isinstance(func, tvm.tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            gemv = sch.get_sblock("gemv")
        except Exception:  # noqa: BLE001 - not one of moec's GEMVs
            return None
        try:
            sch.compute_inline(sch.get_sblock("dequant"))
        except Exception:  # noqa: BLE001 - float weights have no dequant block
            pass
        loops = sch.get_loops(gemv)
        if len(loops) != 3 or sch.get_producers(gemv) or sch.get_consumers(gemv):
            return None  # e.g. a fused bias add: left to dlight's rules, which handle epilogues
        j, row, k = loops
        depth = int(sch.get(k).extent)
        vector = self.vector or self.VECTORS.get(code_width(sch, gemv, depth), 4)
        vector = max(1, min(vector, depth // self.threads))
        ko, kt, kv = sch.split(k, [None, self.threads, vector])
        ro, ri = sch.split(row, [None, self.rows])
        sch.reorder(j, ro, ri, ko, kt, kv)
        sch.bind(sch.fuse(j, ro), "blockIdx.x")
        sch.bind(ri, "threadIdx.y")
        sch.bind(kt, "threadIdx.x")
        if self.stage and depth % (self.threads * vector) == 0:
            for name, lanes in staged_reads(sch, gemv, depth, vector):
                names = [r.source.name for r in sch.get(gemv).reads]
                copy = sch.cache_read(gemv, names.index(name), "local")
                sch.compute_at(copy, kt)
                run = sch.get_loops(copy)[-1]
                _, inner = sch.split(run, [None, lanes])
                sch.vectorize(inner)
        sch.unroll(kv)
        return sch


def code_width(sch: s_tir.Schedule, gemv, depth: int) -> int | str | None:
    """Bits per weight code of the GEMV's packed stack, ``"nested"`` for a nested stack, None for float weights."""
    names = [region.source for region in sch.get(gemv).reads]
    if any(buf.name.endswith("seg0") for buf in names):
        return "nested"
    packed = [buf for buf in names if buf.name.endswith("packed") and str(buf.dtype) == "uint8"]
    return int(packed[0].shape[-1]) * 8 // depth if packed else None


def staged_reads(sch: s_tir.Schedule, gemv, depth: int, vector: int) -> list[tuple[str, int]]:
    """(buffer, vector lanes) of the GEMV's reads that ``FusedGemv`` stages: the float32 activations
    (4 lanes) and unconditionally read codes (``…packed``, ``…seg0``) of a width dividing 8 whose run of
    ``vector`` values is 4, 8 or 16 whole bytes at an aligned offset (rows of a multiple of that many bytes)."""
    out = []
    for region in sch.get(gemv).reads:
        buf = region.source
        if str(buf.dtype) == "float32" and vector % 4 == 0 and int(buf.shape[-1]) == depth:
            out.append((buf.name, 4))
        elif str(buf.dtype) == "uint8" and buf.name.endswith(("packed", "seg0")):
            row_bytes = int(buf.shape[-1])
            bits = row_bytes * 8 // depth
            run = vector * bits // 8
            if bits and 8 % bits == 0 and run in (4, 8, 16) and row_bytes % run == 0:
                out.append((buf.name, run))
    return out


def gpu_rules() -> list[dl.ScheduleRule]:
    """The rules in the order they are tried: moec's GEMVs, GEMM, GEMV, reductions, fallback."""
    return [Checked(rule) for rule in (FusedGemv(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(),
                                       dl.gpu.Reduction(), dl.gpu.GeneralReduction())] + [dl.gpu.Fallback()]


def binds_threads(func: tvm.tirx.PrimFunc) -> bool:
    """Whether ``func`` has a loop bound to a GPU thread or block index, or launches threads itself (the
    ``thread_extent`` scopes of TOPI's GPU sort, which the dispatch of ``argsort`` emits).

    (apache-tvm 0.27 exposes no TIR statement visitor to Python, so this reads the printed script.)
    """
    script = func.script()
    return "T.thread_binding(" in script or "T.launch_thread(" in script


@tvm.transform.module_pass(opt_level=0, name="moec.ResetCpuSchedules")
def reset_cpu_schedules(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Drop ``tirx.is_scheduled`` from PrimFuncs that bind no GPU threads, so the GPU rules schedule them.

    The decode graph marks some functions (RMSNorm) as already scheduled for CPUs; on a GPU such a
    function would otherwise stay a host loop reading device memory.
    """
    for gv, func in list(mod.functions.items()):
        if (isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
                and func.attrs.get("tirx.is_scheduled") and not binds_threads(func)):
            mod[gv] = func.without_attr("tirx.is_scheduled")
    return mod


@tvm.transform.module_pass(opt_level=0, name="moec.CheckGpuBound")
def check_gpu_bound(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Fail the build if a PrimFunc binds no GPU threads (it would run as a host loop on device memory).

    A compiler bug, not bad input: raised as RuntimeError (the CLI reports it as an internal error).
    """
    unbound = [gv.name_hint for gv, func in mod.functions.items()
               if isinstance(func, tvm.tirx.PrimFunc) and not binds_threads(func)]
    if unbound:
        raise RuntimeError(f"no GPU schedule for {', '.join(sorted(unbound))}")
    return mod
