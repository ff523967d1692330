"""x86 AVX-512 VNNI decode GEMV over nested (any-precision) expert stacks, int8 activations.

The kernel is :mod:`moec.lower.schedules.int8_nested` on 16 int32 lanes with ``vpdpbusd`` (unsigned
code bytes times signed activations: odd nibble lanes masked in place) and ``vpternlogd`` bit
selects; its tasks are claimed (``X86Params.int8_claim_lanes``). :func:`portable_dpbusd` computes
the same dots in plain vector TIR, so tests check the kernel's indexing and numerics on x86 hosts
without AVX-512 VNNI.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from tvm import tirx
from tvm.script import tirx as T

from moec.lower.kernels.nested_gemv import NestedGemvSpec
from moec.lower.schedules.int8_nested import DotIsa, int8_nested_gemv, plain_select, splat

LANES = 16


def _dpbusd(acc, codes, x4):
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                   T.reinterpret("int8x64", codes), x4)


def portable_dpbusd(acc, codes, x4):
    """What ``vpdpbusd`` computes (unsigned code bytes times signed activation bytes, 4 per lane, added
    to ``acc``), in plain vector TIR that any LLVM target compiles (for tests)."""
    xi = T.reinterpret(f"int32x{LANES}", x4)
    for j in range(4):
        c = T.reinterpret(f"int32x{LANES}", (codes >> splat(8 * j, LANES)) & splat(0xFF, LANES))
        xv = (xi << splat(24 - 8 * j, LANES, "int32")) >> splat(24, LANES, "int32")
        acc = acc + c * xv
    return acc


def _select(a, b, mask: int):
    """``(a & mask) | (b & ~mask)``: one ``vpternlogd`` (``mask ? a : b`` bitwise, immediate 0xCA),
    called as the intrinsic so LLVM cannot push the byte masks after it through the selects into
    per-part masks (which doubled the 8-bit step's instructions)."""
    out = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.pternlog.d.512",
                                  T.reinterpret("int32x16", splat(mask, LANES)), T.reinterpret("int32x16", a),
                                  T.reinterpret("int32x16", b), T.int32(0xCA))
    return T.reinterpret("uint32x16", out)


def vnni_nested_gemv(spec: NestedGemvSpec, params, portable: bool = False) -> tirx.PrimFunc:
    """The int8-activation nested GEMV for ``spec``; ``params`` an
    :class:`~moec.lower.schedules.x86.X86Params` (``int8_nested_tile_vectors``, ``int8_claim_lanes``).
    ``portable``: the VNNI and ternary-logic instructions as plain TIR (tests on hosts without them)."""
    isa = DotIsa(LANES, portable_dpbusd if portable else _dpbusd, plain_select(LANES) if portable else _select,
                 unsigned_codes=True, claim_lanes=params.int8_claim_lanes)
    return int8_nested_gemv(spec, isa, params.int8_nested_tile_vectors)
