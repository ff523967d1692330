"""A target backend: everything that differs per kind of target, in one object.

A backend names its Relax phase list, the linear emitter that computes quantized matmuls,
the post-build step (CUDA: fatbin), the toolchain it needs, and the device the bundle's
runtime runs on. ``moec.lower.backends.backend_for`` picks one for a target preset.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import tvm

from moec.core.errors import MoecError
from moec.core.targets import TargetPreset, install_hint
from moec.lower.kernel_linear import KernelEmitter
from moec.lower.kernels.activations import AUTO
from moec.lower.linear import LinearEmitter
from moec.lower.pipeline import Phase


@dataclass(frozen=True)
class Backend:
    """A CPU backend: LLVM code, moec's scheduled kernels from ``schedules``, a plain ``lib.so``."""

    name: str
    phases: tuple[Phase, ...]
    schedules: ModuleType | None = None
    #: Device ``moec.runtime`` runs the bundle's functions on (recorded in the manifest).
    runtime_device: str = "cpu"

    def require_toolchain(self, preset: TargetPreset) -> None:
        """Raise a one-line :class:`MoecError` if a compiler the preset needs is missing."""
        if preset.cross_compiler and shutil.which(preset.cross_compiler) is None:
            raise MoecError(f"target '{preset.name}' needs the cross compiler '{preset.cross_compiler}', which is "
                            f"not on PATH; {install_hint(preset.cross_compiler)}")

    def emitter(self, target: tvm.target.Target, activations: str = AUTO) -> LinearEmitter:
        """The linear emitter of this backend's kernels for ``target`` (``activations``: float32, int8, or auto;
        int8 needs an int8 GEMV in the schedules, which the kernel builder checks with a one-line error;
        the emitter's ``activations`` is the resolved type)."""
        return KernelEmitter(target, activations)

    def post_build(self, executable, target: tvm.target.Target, folder: str | os.PathLike
                   ) -> tuple[dict[str, Path], dict | None]:
        """Files to ship beside ``lib.so`` (bundle name -> path) and their manifest entry; none on CPUs."""
        return {}, None

    def manifest(self) -> dict:
        return {"name": self.name, "runtime_device": self.runtime_device}
