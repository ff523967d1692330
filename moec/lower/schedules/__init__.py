"""Per-target-family kernel schedules: one module per family, looked up from a TVM target."""

from __future__ import annotations

from types import ModuleType

import tvm
from tvm.target import codegen

from moec.core.errors import MoecError
from moec.lower.schedules import arm, x86

#: Family name -> schedule module: ``PARAMS`` (with ``tile_for``), ``gemv_params``, ``schedule_gemv``,
#: ``grouped_gemm_params`` and optionally ``int8_gemv``.
FAMILIES: dict[str, ModuleType] = {"x86": x86, "arm": arm}

_TRIPLE_PREFIXES = {"x86_64": "x86", "i686": "x86", "i386": "x86", "aarch64": "arm",
                    "arm": "arm", "riscv64": "riscv"}


def target_family(target: tvm.target.Target) -> str:
    """The schedule family of an LLVM CPU target (``x86``, ...), from its ``mtriple`` or the host's."""
    target = tvm.target.Target(target)
    if target.kind.name != "llvm":
        raise MoecError(f"no CPU kernel schedules for target kind {target.kind.name!r}; choices: llvm")
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    for prefix, family in _TRIPLE_PREFIXES.items():
        if triple.startswith(prefix):
            return family
    return triple


def family_module(target: tvm.target.Target) -> ModuleType:
    """The schedule module for ``target``; a clear error lists the families that exist."""
    family = target_family(target)
    try:
        return FAMILIES[family]
    except KeyError:
        raise MoecError(f"no kernel schedules for target family {family!r}; choices: "
                        f"{', '.join(sorted(FAMILIES))}") from None


def kernel_tile(target: tvm.target.Target, n: int, bits: int | None, activations: str) -> int:
    """Rows per tile of the kernel layout that ``target``'s schedules expect for a weight of ``n`` output
    rows and ``bits``-bit codes (``to_kernel_layout``; a fused SwiGLU ``[w1; w3]`` stack: ``n`` of ``w1``;
    ``bits`` None: a nested stack, ``nested_kernel_layout``) read by kernels taking ``activations``
    (``"int8"`` or ``"float32"``: the tile is chosen for the kernel that reads it)."""
    return family_module(target).gemv_params(tvm.target.Target(target)).tile_for(n, bits, activations)
