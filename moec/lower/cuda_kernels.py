"""CUDA kernels of a compiled module: the generated CUDA C source and its ahead-of-time nvcc compile.

With a CUDA target, ``tvm.compile`` (apache-tvm 0.27 wheel, on a machine without a CUDA driver)
leaves the device code as CUDA C inside the module; ``export_library`` embeds that source in
``lib.so``, and TVM's CUDA runtime compiles it when the library is loaded on the device (through
``tvm_callback_cuda_compile``: NVRTC from ``cuda-bindings``, or nvcc with
``TVM_CUDA_COMPILE_MODE=nvcc``). At build time moec also compiles the same source for the
preset's GPU architecture with nvcc: the bundle then carries ``kernels.cu`` and
``kernels.<arch>.fatbin``, and a kernel that does not compile for the target fails the build
here rather than on the device.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import tvm

from moec.core.errors import MoecError


@dataclass
class CudaKernels:
    """The CUDA side of a build: source, architecture and the fatbin nvcc made from it."""

    source: str
    arch: str
    fatbin: bytes

    def write(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write ``kernels.cu`` and ``kernels.<arch>.fatbin`` into ``folder``; bundle names -> paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        src, fat = folder / "kernels.cu", folder / f"kernels.{self.arch}.fatbin"
        src.write_text(self.source)
        fat.write_bytes(self.fatbin)
        return {src.name: src, fat.name: fat}

    def manifest(self) -> dict:
        return {"arch": self.arch, "source_sha256": hashlib.sha256(self.source.encode()).hexdigest(),
                "fatbin": f"kernels.{self.arch}.fatbin", "kernels": count_kernels(self.source)}


def find_nvcc() -> str | None:
    """nvcc on PATH, or under ``$CUDA_HOME/bin`` / ``/usr/local/cuda/bin``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def require_nvcc(arch: str) -> str:
    """The nvcc to compile kernels for ``arch`` with, or a one-line error saying what is needed."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise MoecError(f"compiling CUDA kernels for {arch} needs nvcc (the CUDA toolkit, 11.4 or newer for "
                        f"sm_87), which is not on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin")
    return nvcc


def cuda_source(module: tvm.runtime.Module) -> str | None:
    """The CUDA C source of the device module(s) imported by ``module`` (None if there are none)."""
    sources = []
    stack = list(module.imports)
    while stack:
        mod = stack.pop(0)
        if mod.kind == "cuda":
            sources.append(mod.inspect_source("cuda"))
        stack.extend(mod.imports)
    return "\n".join(sources) if sources else None


def count_kernels(source: str) -> int:
    """``__global__`` functions in a CUDA source."""
    return source.count("extern \"C\" __global__")


def compile_cuda(module: tvm.runtime.Module, target: tvm.target.Target) -> CudaKernels:
    """Compile the CUDA source of ``module`` for ``target``'s arch with nvcc (a fatbin)."""
    arch = str(target.attrs.get("arch", ""))
    if not arch.startswith("sm_"):
        raise MoecError(f"CUDA target {target.kind.name} names no arch (e.g. sm_87); set tvm_target.arch")
    source = cuda_source(module)
    if source is None:
        raise MoecError("the compiled module has no CUDA kernels")
    nvcc = require_nvcc(arch)
    from tvm.support import nvcc as tvm_nvcc
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(nvcc).parent}{os.pathsep}{old_path}"  # TVM runs plain `nvcc`
    try:
        with target:
            fatbin = tvm_nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc")
    except Exception as exc:  # noqa: BLE001 - nvcc failures arrive as RuntimeError with its log
        lines = [ln for ln in str(exc).splitlines() if ": error" in ln] or str(exc).strip().splitlines()[-1:] or ["?"]
        raise MoecError(f"nvcc could not compile the CUDA kernels for {arch}: {lines[0].strip()}") from None
    finally:
        os.environ["PATH"] = old_path
    return CudaKernels(source, arch, bytes(fatbin))
