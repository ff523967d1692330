"""Run the CUDA C that TVM generates for a bound (threaded) kernel on this CPU: the source's kernel is compiled
with g++ against ``cuda_host.h`` (threads as coroutines, ``__syncthreads`` and warp shuffles as barriers, the
block's ``__shared__`` arrays as statics) and launched with the grid and block of the PrimFunc's thread
bindings. What the serial (``bind=False``) forms cannot check — the thread indexing, shared memory and its
barrier, the shuffles' lanes — runs here exactly as written for the GPU; arithmetic is the host's (``__dp4a``
in C, float32 without fused multiply-adds unless the source asks), so compare within float tolerance."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import tirx

HEADER = Path(__file__).with_name("cuda_host.h")
_CACHE = Path(tempfile.gettempdir()) / "moec-cuda-host"
_TAGS = ("blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "threadIdx.y", "threadIdx.z")


def launch_dims(func: tirx.PrimFunc, values: dict[str, int] | None = None
                ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) of the PrimFunc's thread-bound loops, read from its TVMScript; an extent over symbolic
    variables (a prefill's row count ``T_1``, its position ``P``) is evaluated at ``values``."""
    extents = dict.fromkeys(_TAGS, 1)
    for extent, tag in re.findall(r'T\.thread_binding\((.*?), thread="([\w.]+)"\)', func.script()):
        extents[tag] = int(eval(re.sub(r"T\.u?int\d+\(", "(", extent), {"__builtins__": {}}, dict(values or {})))
    return tuple(extents[t] for t in _TAGS[:3]), tuple(extents[t] for t in _TAGS[3:])


def kernel_source(func: tirx.PrimFunc, arch: str = "sm_87", cse: bool = True) -> str:
    """The CUDA C TVM generates for ``func`` (``cse=False``: without common-subexpression elimination, which can
    hand a kernel host-computed values, ``cse_v1 = T * 256``, as parameters a launch here cannot know; the
    bundle's build keeps it)."""
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host="llvm")
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": not cse}):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    return lib.mod.imports[0].inspect_source()


class HostKernel:
    """The single ``__global__`` kernel of a CUDA C source (as TVM generates it), callable on numpy arrays by
    parameter name (``name_ptr`` takes ``name``); ``buffers`` (name → TIR buffer) checks their shapes."""

    def __init__(self, source: str, grid: tuple[int, int, int], block: tuple[int, int, int],
                 buffers: dict | None = None) -> None:
        body = source[source.index('extern "C"'):]
        # a block's shared arrays: statics (blocks run one after another); the alignment goes first in C++
        body = re.sub(r"__shared__ (alignas\(\d+\) )?", lambda m: f"{m.group(1) or ''}static ", body)
        decl = re.search(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)', body)
        if decl is None:
            raise ValueError("no kernel declaration in the CUDA source")
        self.name = decl.group(1)
        params = [p.replace("__restrict__", "").split() for p in decl.group(2).split(",")]
        self.params = [(" ".join(p[:-1]), p[-1]) for p in params]  # (C type, name)
        self.grid, self.block, self.buffers = grid, block, buffers or {}
        # pointers as they are; a scalar (a symbolic extent such as a row count) travels as an integer
        args = ", ".join(f"({t})moec_args[{i}]" if t.endswith("*") else f"({t})(intptr_t)moec_args[{i}]"
                         for i, (t, _) in enumerate(self.params))
        launcher = (f"\nstatic void* moec_args[{len(self.params)}];\n"
                    f"static void moec_body() {{ {self.name}({args}); }}\n"
                    f'extern "C" int moec_launch(void** args, unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                    f"unsigned by, unsigned bz, int reverse) {{\n"
                    f"  for (int i = 0; i < {len(self.params)}; ++i) moec_args[i] = args[i];\n"
                    f"  return moec_emu::run(moec_body, {{gx, gy, gz}}, {{bx, by, bz}}, reverse);\n}}\n")
        self.lib = ctypes.CDLL(str(_compile(f'#include "{HEADER}"\n{body}{launcher}')))
        self.lib.moec_launch.restype = ctypes.c_int

    @classmethod
    def of(cls, func: tirx.PrimFunc, arch: str = "sm_87", values: dict[str, int] | None = None,
           cse: bool = True) -> "HostKernel":
        """The kernel TVM generates for ``func`` (one thread-bound kernel), launched as its bindings say (symbolic
        extents at ``values``, which the launch must then pass as the scalar parameters of those names; ``cse``: as
        :func:`kernel_source`)."""
        return cls(kernel_source(func, arch, cse), *launch_dims(func, values), {p.name: p for p in func.params})

    def __call__(self, reverse: bool = False, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        """Launch once on ``arrays`` (outputs included; scalar parameters as ints), the threads of a block run in
        order or ``reverse``; returns the arrays as the kernel left them (copies, 64-byte aligned like device allocations)."""
        held, ptrs = {}, []
        for ctype, pname in self.params:
            name = pname[:-4] if pname.endswith("_ptr") else pname
            if name not in arrays:
                raise KeyError(f"kernel {self.name} needs buffer {name!r}")
            if not ctype.endswith("*"):  # a scalar parameter
                ptrs.append(int(arrays[name]))
                continue
            a = np.asarray(arrays[name])
            if name in self.buffers:
                buf = self.buffers[name]
                a = a.astype(str(buf.dtype), copy=False)
                want = [int(d) if isinstance(d, tirx.IntImm) else None for d in buf.shape]  # None: symbolic
                if len(want) != a.ndim or any(w is not None and w != d for w, d in zip(want, a.shape)):
                    raise ValueError(f"{name}: shape {a.shape}, the kernel's {tuple(buf.shape)}")
            held[name] = _aligned(a)
            ptrs.append(held[name].ctypes.data)
        argv = (ctypes.c_void_p * len(ptrs))(*ptrs)
        rc = self.lib.moec_launch(argv, *self.grid, *self.block, int(reverse))
        if rc:
            raise RuntimeError(f"kernel {self.name}: " + ("a barrier not every thread of its block or warp reaches"
                                                          if rc == 1 else "more than 1024 threads a block"))
        return held


def _aligned(a: np.ndarray) -> np.ndarray:
    raw = np.empty(a.nbytes + 64, np.uint8)
    off = -raw.ctypes.data % 64
    out = raw[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _compile(code: str) -> Path:
    key = hashlib.sha256(code.encode() + HEADER.read_bytes()).hexdigest()[:20]
    so = _CACHE / f"{key}.so"
    if not so.exists():
        _CACHE.mkdir(parents=True, exist_ok=True)
        src = _CACHE / f"{key}.{os.getpid()}.cc"
        src.write_text(code)
        tmp = so.with_suffix(f".{os.getpid()}.so")
        res = subprocess.run(["g++", "-std=c++17", "-O1", "-fno-strict-aliasing", "-ffp-contract=off", "-shared",
                              "-fPIC", "-w", "-o", str(tmp), str(src)], capture_output=True, text=True)
        src.unlink()
        if res.returncode:
            raise RuntimeError(f"g++ failed on the emulated kernel:\n{res.stderr[-3000:]}")
        tmp.replace(so)
    return so
