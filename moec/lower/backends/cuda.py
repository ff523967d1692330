"""CUDA backend (Jetson Orin): dlight GPU rules on fused dequantize-GEMVs, nvcc fatbin shipped in the bundle."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tvm

from moec.core.errors import MoecError
from moec.core.targets import TargetPreset
from moec.lower.backends.base import Backend
from moec.lower.cuda_kernels import compile_cuda, require_nvcc
from moec.lower.gpu_linear import GpuLinearEmitter
from moec.lower.kernels.activations import AUTO
from moec.lower.linear import LinearEmitter
from moec.lower.pipeline import CUDA_PHASES, CUDA_PHASES_NO_GRAPHS


@dataclass(frozen=True)
class CudaBackend(Backend):
    """Host code for the preset's CPU (cross-compiled), device code as CUDA C plus an sm_XX fatbin."""

    #: Runs of static-argument kernels replay as CUDA graphs (``CUDA_PHASES``; else ``CUDA_PHASES_NO_GRAPHS``).
    cuda_graphs: bool = True

    def require_toolchain(self, preset: TargetPreset) -> None:
        super().require_toolchain(preset)
        try:
            require_nvcc(str(preset.tvm_target.get("arch", "the GPU")))
        except MoecError as exc:
            raise MoecError(f"target '{preset.name}': {exc}") from None

    def emitter(self, target: tvm.target.Target, activations: str = AUTO) -> LinearEmitter:
        # auto: float32 until int8 is timed on a GPU (the int8 bodies are built and checked, not yet measured)
        return GpuLinearEmitter(activations="float32" if activations == AUTO else activations)

    def post_build(self, executable, target: tvm.target.Target, folder: str | os.PathLike
                   ) -> tuple[dict[str, Path], dict | None]:
        kernels = compile_cuda(executable.mod, target)
        return kernels.write(folder), kernels.manifest()


    def manifest(self) -> dict:
        # runs of static-argument kernels replay as CUDA graphs (pipeline.capture_cuda_graphs): every call must
        # pass the same weight tensors, which the runtime checks before it drives the bundle over RPC
        return {**super().manifest(), "cuda_graphs": self.cuda_graphs}


BACKEND = CudaBackend("cuda", CUDA_PHASES, runtime_device="cuda")
#: A preset with ``cuda_graphs: false``.
BACKEND_NO_GRAPHS = CudaBackend("cuda", CUDA_PHASES_NO_GRAPHS, runtime_device="cuda", cuda_graphs=False)
