"""Relax phase lists (CPU, CUDA), run with an optional IR dump after each phase.

A backend (``moec.lower.backends``) holds one ordered list of named phases. ``build`` runs it
through ``tvm.compile(relax_pipeline=...)``; ``--debug-dump DIR`` writes ``NN-<phase>.py`` after each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import tvm
from tvm import relax

from moec.lower.schedules.cpu_rules import cpu_rules
from moec.lower.schedules.gpu_rules import check_gpu_bound, gpu_rules, reset_cpu_schedules
from moec.lower.step_builtins import drop_weight_checks, keep_static_storage


Phase = tuple[str, Callable[[tvm.target.Target], list]]


def _dispatch(target) -> list:
    return [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]


def _legalize(target) -> list:
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def _cpu_schedule(target) -> list:
    from tvm.s_tir import dlight as dl
    return [dl.ApplyDefaultSchedule(*cpu_rules())]


def _gpu_schedule(target) -> list:
    """dlight GPU rules: (dequantize-fused) GEMV/GEMM, reductions, and a thread-binding fallback."""
    from tvm.s_tir import dlight as dl

    return [reset_cpu_schedules, dl.ApplyDefaultSchedule(*gpu_rules()), check_gpu_bound]


def _dataflow_lower(target) -> list:
    return [relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite()]


def _finalize(target) -> list:
    return [relax.transform.StaticPlanBlockMemory(), relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(), relax.transform.LowerRuntimeBuiltin(), keep_static_storage,
            relax.transform.ComputePrimValue(), relax.transform.VMShapeLower(), drop_weight_checks,
            relax.transform.AttachGlobalSymbol()]


@tvm.transform.module_pass(opt_level=0, name="CaptureCudaGraphs")
def capture_cuda_graphs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Relax's ``RewriteCUDAGraph`` (which acts only under ``relax.backend.use_cuda_graph``): the runs of kernels
    whose arguments are all static (weights after a function's ``num_input``, statically planned buffers) are
    lifted into functions the VM captures as a CUDA graph on the first call and replays after, one launch for
    the run; kernels that read the step's inputs (token, position, caches) stay launched one by one. A replay
    uses its first call's device addresses, so every call must pass the same weight tensors: a local session
    does, and over RPC the resident entries (``resident.py``) read the ones held on the device (``set_input``
    would copy them each call)."""
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        return relax.transform.RewriteCUDAGraph()(mod)


def _cuda_finalize(target) -> list:
    first, *rest = _finalize(target)
    return [first, capture_cuda_graphs, *rest]


CPU_PHASES: tuple[Phase, ...] = (
    ("dispatch", _dispatch), ("legalize", _legalize), ("schedule", _cpu_schedule),
    ("dataflow_lower", _dataflow_lower), ("finalize", _finalize))
CUDA_PHASES: tuple[Phase, ...] = (
    ("dispatch", _dispatch), ("legalize", _legalize), ("schedule", _gpu_schedule),
    ("dataflow_lower", _dataflow_lower), ("finalize", _cuda_finalize))
#: CUDA without CUDA graphs (a preset's ``cuda_graphs: false``): every kernel launched on every call.
CUDA_PHASES_NO_GRAPHS: tuple[Phase, ...] = CUDA_PHASES[:-1] + (("finalize", _finalize),)


def make_pipeline(phases: Sequence[Phase], debug_dump: str | os.PathLike | None = None):
    """A module pass that runs ``phases`` (a backend's list) in order, dumping IR after each if asked."""
    dump = Path(debug_dump) if debug_dump else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)

    @tvm.transform.module_pass(opt_level=0, name="moec_pipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        target = tvm.target.Target.current()
        if dump is not None:
            (dump / "00-input.py").write_text(mod.script(show_meta=False))
        for n, (name, passes) in enumerate(phases, start=1):
            mod = tvm.transform.Sequential(passes(target), name=name)(mod)
            if dump is not None:
                (dump / f"{n:02d}-{name}.py").write_text(mod.script(show_meta=False))
        return mod

    return _pipeline
