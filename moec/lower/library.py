"""Build a compiled decode module for a target and export it as a shared library."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax
from tvm.support import cc

from moec.core.errors import MoecError
from moec.core.outputs import raise_if_interrupted
from moec.lower.backends.base import Backend
from moec.lower.decode_graph import DecodeBuilder
from moec.lower.prefill_graph import PrefillBuilder
from moec.lower.resident import add_resident_entries
from moec.lower.linear import LinearEmitter
from moec.lower.params import ModelParams
from moec.lower.pipeline import make_pipeline
from moec.core.config import MoEConfig


@dataclass
class BuildResult:
    lib_path: str
    seconds: float
    target: str
    entries: list[str] = field(default_factory=list)
    #: Bundle name -> path of files the build made besides the library (CUDA source and fatbin).
    extra_files: dict[str, Path] = field(default_factory=dict)
    #: Manifest entry of the CUDA kernels (arch, source sha256, fatbin name), or None.
    cuda: dict | None = None


def build_module(cfg: MoEConfig, params: ModelParams, target: tvm.target.Target, backend: Backend,
                 lib_path: str | os.PathLike, cross_compiler: str | None = None,
                 debug_dump: str | os.PathLike | None = None, emitter: LinearEmitter | None = None) -> BuildResult:
    """Relax decode graph → the backend's phases → ``lib_path`` (cross-compiled if asked) + post-build files.

    ``emitter`` decides how linear layers are computed (default: the reference emitter); a
    kernel emitter needs ``params`` already in its layout (``apply_kernel_layout``).
    """
    t0 = time.time()
    linear = emitter or LinearEmitter()
    bb = relax.BlockBuilder()
    DecodeBuilder(cfg, params, linear).build(bb)
    prefill = PrefillBuilder(cfg, params, linear)
    if prefill.supported():
        prefill.build(bb)
    add_resident_entries(bb)  # the entries a session on a remote device calls (weights held there)
    mod = bb.get()
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=make_pipeline(backend.phases, debug_dump))
    raise_if_interrupted()  # a SIGINT inside the build may have been swallowed by a schedule rule
    extra, cuda = backend.post_build(ex, target, Path(lib_path).parent)
    try:
        if cross_compiler:
            ex.export_library(str(lib_path), fcompile=cc.cross_compiler(cross_compiler))
        else:
            ex.export_library(str(lib_path))
    except Exception as exc:  # compiler/linker failures surface as RuntimeError/TVMError
        raise MoecError(f"linking {lib_path} failed: {str(exc).strip().splitlines()[-1]}") from None
    entries = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
    return BuildResult(str(lib_path), time.time() - t0, str(target), sorted(entries), extra, cuda)
