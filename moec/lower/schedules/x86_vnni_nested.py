"""x86 AVX-512 VNNI decode GEMV over nested (any-precision) expert stacks, int8 activations.

The kernel is :mod:`moec.lower.schedules.int8_nested` on 16 int32 lanes with ``vpdpbusd`` (unsigned
code bytes times signed activations: odd nibble lanes masked in place) and ``vpternlogd`` bit
selects; its tasks are claimed (``X86Params.int8_claim_lanes``). ``portable=True`` computes the same
dots and selects in plain vector TIR (``x86_vnni.portable_dpbusd``), so tests check the kernel's
indexing and numerics on x86 hosts without AVX-512 VNNI.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from tvm import tirx
from tvm.script import tirx as T

from moec.lower.kernels.nested_gemv import NestedGemvSpec
from moec.lower.schedules.int8_nested import DotIsa, int8_nested_gemv, plain_select, splat
from moec.lower.schedules.x86_vnni import dot_instructions

LANES = 16


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
    dpbusd = dot_instructions(portable)[0]  # the fixed VNNI kernel's dot (or its plain-TIR twin)
    isa = DotIsa(LANES, lambda acc, codes, x4: dpbusd(acc, T.reinterpret("int8x64", codes), x4),
                 plain_select(LANES) if portable else _select, unsigned_codes=True,
                 claim_lanes=params.int8_claim_lanes)
    return int8_nested_gemv(spec, isa, params.int8_nested_tile_vectors)
