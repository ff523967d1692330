"""The TVM runtime as a device has it: the runtime library alone is enough to run a bundle.

A device (a Jetson, a board, a GPU server) need not carry TVM's compiler library (``libtvm_compiler``,
about 260 MB with LLVM): without it ``import tvm`` loads only ``libtvm_runtime``, and two things a
bundle needs are then missing, which this module supplies:

- the runtime's sidecar libraries, which TVM loads only together with its compiler: ``libtvm_runtime_extra``
  (``tvm.contrib.sort.argsort``, the router's top-k) and ``libtvm_runtime_cuda`` (the CUDA device API);
- the compiled CUDA kernels. TVM 0.27 embeds a CUDA bundle's device code in ``lib.so`` as CUDA C and
  compiles it when the library loads, through the ``tvm_callback_cuda_compile`` hook (NVRTC or nvcc).
  The bundle already ships that source compiled by nvcc at build time (``kernels.<arch>.fatbin``, hashed in
  the manifest), so :func:`use_bundle_kernels` answers the hook with the verified fatbin when the source
  asked for is the bundle's and the GPU is the arch it was built for: no CUDA compiler on the device, no
  compile at load, and the kernels that run are the ones the manifest names. Any other source goes to
  the hook TVM had (its NVRTC/nvcc compile where the compiler is installed).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import tvm
import tvm.runtime
import tvm.runtime.vm  # noqa: F401 - ``tvm.runtime`` does not import it when only the runtime library is loaded
import tvm_ffi

from moec.core.errors import MoecError

HOOK = "tvm_callback_cuda_compile"
_SIDECARS = ("tvm_runtime_extra", "tvm_runtime_cuda")
#: (CUDA source, fatbin) of every bundle this process loaded, for the compile hook.
_KERNELS: list[tuple[str, bytes]] = []
_FALLBACK: list = []  # the hook registered before moec's (TVM's compile), if any


def runtime_only() -> bool:
    """Whether TVM's compiler library is absent here (or left out with ``TVM_USE_RUNTIME_LIB=1``)."""
    return bool(getattr(tvm.base, "_RUNTIME_ONLY", False))


def load_sidecars() -> list[str]:
    """Load the runtime sidecar libraries a runtime-only TVM leaves out; the names loaded now.

    A sidecar that cannot load (``libtvm_runtime_cuda`` on a machine without the CUDA driver) is skipped:
    a CUDA bundle then stops at the GPU check with one line."""
    if not runtime_only():
        return []
    from tvm_ffi.libinfo import load_lib_ctypes
    loaded = tvm.base._LOADED_LIBS
    where = [Path(loaded["tvm_runtime"]._name).resolve().parent]
    done = []
    for name in _SIDECARS:
        if name in loaded:
            continue
        try:
            loaded[name] = load_lib_ctypes(package="tvm", target_name=name, extra_lib_paths=where, mode="RTLD_LOCAL")
            done.append(name)
        except (OSError, RuntimeError):
            pass
    return done


def gpu_arch(dev) -> str:
    """``sm_XY`` of a CUDA device (compute capability X.Y)."""
    return "sm_" + str(dev.compute_version).replace(".", "")


def use_bundle_kernels(source: bytes, fatbin: bytes, built_for: str, dev) -> None:
    """Answer TVM's CUDA compile hook with ``fatbin`` for ``source`` (both verified bundle files) when ``dev``
    is the ``built_for`` arch. On another GPU TVM compiles the source itself where it can; where it cannot,
    a one-line :class:`MoecError`."""
    arch = gpu_arch(dev)
    if arch != built_for:
        if (_FALLBACK[0] if _FALLBACK else _current_hook()) is None:
            raise MoecError(f"the bundle's CUDA kernels are built for {built_for} but this GPU is {arch}, and no CUDA "
                            "compiler is here to build them for it (TVM's compiler library with NVRTC or nvcc); "
                            f"rebuild the bundle with --target cuda:{arch}")
        return
    text = source.decode()
    if not any(known == text for known, _ in _KERNELS):
        _KERNELS.append((text, bytes(fatbin)))
    if not _FALLBACK:
        _FALLBACK.append(_current_hook())
        tvm_ffi.register_global_func(HOOK, _compile_hook, override=True)


def _current_hook():
    hook = tvm_ffi.get_global_func(HOOK, allow_missing=True)
    if hook is None and not runtime_only():
        try:  # registers TVM's own NVRTC/nvcc compile
            importlib.import_module("tvm.support.nvcc")
        except ImportError:
            return None
        hook = tvm_ffi.get_global_func(HOOK, allow_missing=True)
    return hook


def _compile_hook(code: str) -> bytes:
    """``tvm_callback_cuda_compile``: a bundle's fatbin for (a module of) its own source, else TVM's compile."""
    for known, fatbin in _KERNELS:
        if code == known or code in known:  # lib.so embeds the source of each device module; kernels.cu joins them
            return fatbin
    fallback = _FALLBACK[0] if _FALLBACK else None
    if fallback is None:
        digest = hashlib.sha256(code.encode()).hexdigest()[:12]
        raise MoecError(f"CUDA source {digest}… is not a loaded bundle's and no CUDA compiler is registered here")
    return fallback(code)


load_sidecars()
