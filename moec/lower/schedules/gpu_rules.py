"""GPU (CUDA) schedules of the Relax-level kernels: dlight's GPU rules, each result checked before it is kept.

dlight's GPU ``Reduction`` rule in apache-tvm 0.27 can return a schedule that later fails to
lower (e.g. for the attention-scores reduction with a fused elementwise producer: "Cross-thread
reduction requires all the reduction-related loops to be the deepest"). ``Checked`` runs the
cross-thread-reduction lowering on each candidate and, if it fails, lets the next rule (finally
``Fallback``, which only binds threads) schedule the function instead.
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
        space = self.rule.apply(func, target, tunable)
        if space is None:
            return None
        for sch in space if isinstance(space, list) else [space]:
            try:
                s_tir.transform.LowerCrossThreadReduction()(tvm.IRModule({"main": sch.mod["main"]}))
            except Exception as exc:  # noqa: BLE001 - TVM raises a generic error
                log.debug("%s rejected for %s: %s", type(self.rule).__name__,
                          func.attrs.get("global_symbol", "?") if func.attrs else "?",
                          str(exc).strip().splitlines()[0])
                return None
        return space


def gpu_rules() -> list[dl.ScheduleRule]:
    """The rules in the order they are tried: GEMM, (dequantize-fused) GEMV, reductions, fallback."""
    return [Checked(rule) for rule in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(),
                                       dl.gpu.Reduction(), dl.gpu.GeneralReduction())] + [dl.gpu.Fallback()]
