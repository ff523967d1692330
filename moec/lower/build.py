"""Build a compiled decode module for a target and export it as a shared library."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from moec.errors import MoecError
from moec.lower.decode_graph import DecodeBuilder
from moec.lower.linear import LinearEmitter
from moec.lower.params import ModelParams
from moec.lower.pipeline import make_pipeline
from moec.models.config import MoEConfig


@dataclass
class BuildResult:
    lib_path: str
    seconds: float
    target: str
    #: Bundle name -> path of files the build made besides the library (CUDA source and fatbin).
    extra_files: dict[str, Path] = field(default_factory=dict)
    #: Manifest entry of the CUDA kernels (arch, source sha256, fatbin name), or None.
    cuda: dict | None = None


def build_module(cfg: MoEConfig, params: ModelParams, target: tvm.target.Target, family: str,
                 lib_path: str | os.PathLike, cross_compiler: str | None = None,
                 debug_dump: str | os.PathLike | None = None, emitter: LinearEmitter | None = None) -> BuildResult:
    """Relax decode graph → per-family phases → ``lib_path`` (cross-compiled if asked).

    ``emitter`` decides how linear layers are computed (default: the reference emitter); a
    kernel emitter needs ``params`` already in its layout (``apply_kernel_layout``).
    """
    t0 = time.time()
    func = DecodeBuilder(cfg, params, emitter or LinearEmitter()).build()
    mod = tvm.IRModule({"decode": func}) if not isinstance(func, tvm.IRModule) else func
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=make_pipeline(family, debug_dump))
    extra, cuda = {}, None
    if target.kind.name == "cuda":
        from moec.lower.cuda_build import compile_cuda
        kernels = compile_cuda(ex.mod, target)
        extra, cuda = kernels.write(Path(lib_path).parent), kernels.manifest()
    try:
        if cross_compiler:
            from tvm.support import cc
            ex.export_library(str(lib_path), fcompile=cc.cross_compiler(cross_compiler))
        else:
            ex.export_library(str(lib_path))
    except Exception as exc:  # compiler/linker failures surface as RuntimeError/TVMError
        raise MoecError(f"linking {lib_path} failed: {str(exc).strip().splitlines()[-1]}") from None
    return BuildResult(str(lib_path), time.time() - t0, str(target), extra, cuda)
