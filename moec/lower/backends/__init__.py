"""Backend registry: one object per target kind (x86, arm, cuda), chosen from a preset's TVM target.

A CPU whose family has no tuned kernel schedules is refused with a one-line error (it would
otherwise run the slow reference kernels without saying so); pass ``reference_kernels=True``
to ``backend_for`` to build it on the reference emitter on purpose.
"""

from __future__ import annotations

import logging

import tvm

from moec.core.errors import MoecError
from moec.core.targets import TargetPreset
from moec.lower.backends import arm, cuda, x86
from moec.lower.backends.base import Backend
from moec.lower.pipeline import CPU_PHASES
from moec.lower.schedules import target_family

log = logging.getLogger("moec")

#: Backend name -> backend (explicit registration; names are TVM target kinds or LLVM CPU families).
BACKENDS: dict[str, Backend] = {b.name: b for b in (x86.BACKEND, arm.BACKEND, cuda.BACKEND)}

def backend_name(target: tvm.target.Target) -> str:
    """The backend a TVM target needs: its kind for GPUs, its CPU family for LLVM."""
    target = tvm.target.Target(target)
    return target_family(target) if target.kind.name == "llvm" else target.kind.name


def backend_for(preset: TargetPreset, reference_kernels: bool = False) -> Backend:
    """The backend of ``preset``; a one-line error when none exists (never a silent slow fallback)."""
    name = backend_name(preset.tvm())
    if name == "cuda" and not preset.cuda_graphs:
        return cuda.BACKEND_NO_GRAPHS
    if name in BACKENDS:
        return BACKENDS[name]
    if reference_kernels and preset.tvm_target.get("kind") == "llvm":
        log.warning("target '%s': no tuned kernel schedules for CPU family '%s'; building with the slow "
                    "reference kernels", preset.name, name)
        return Backend(name, CPU_PHASES)
    raise MoecError(f"target '{preset.name}': no backend with tuned kernels for '{name}' (it would run slow "
                    f"reference kernels); choices: {', '.join(sorted(BACKENDS))}")
