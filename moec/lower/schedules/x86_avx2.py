"""x86 AVX2 int8-activation decode GEMVs (fixed and nested): the VNNI kernels' definitions on AVX2 dots.

AVX2 has no 4-byte dot instruction; ``vpmaddubsw`` (unsigned bytes times signed bytes, adjacent pairs
summed to saturating int16) then ``vpmaddwd`` against ones (adjacent int16 pairs to int32) computes
``vpdpbusd``'s per-lane sum of 4 products, exactly while no pair sum leaves int16:

- codes up to 4 bits (0..15, odd planes shifted down, never masked in place): a pair is at most
  ``2 · 15 · 127 = 3810``, so :func:`pairs` multiplies them as they are, and 8 such pair sums still add
  up exactly in int16 (30480): the kernels add a block's first steps with ``vpaddw`` and widen once
  (:func:`quads`; fixed GEMV: 2 steps of 16 codes at 2 bits, 4 steps of 8 at 4; nested: a 32-code chunk,
  8-bit codes as two nibble sums, times 16 and 1). Measured on Zen 1 (2 threads, 2026-12-04): the
  fixed GEMV 2 / 4 bits 20 / 6 % faster than a ``vpmaddwd`` per dot, the nested one 14–17 % at every
  width;
- fixed 8-bit codes are recentred to signed ``q − 128`` (the zero point shifted to match, as on ARM) and
  :func:`dot` moves their sign onto the activation (``vpabsb``, ``vpsignb``): ``|c| · sign(c)·x``, a pair
  at most ``2 · 128 · 127 = 32512`` (activations are ``−127..127``, codes ``−128..127``; 5 instructions).

The fixed GEMV is :func:`moec.lower.schedules.x86_vnni.int8_gemv` and the nested one
:func:`moec.lower.schedules.int8_nested.int8_nested_gemv`, both on :data:`AVX2` (8 int32 lanes, one ymm
register; signed code bytes; plain bit selects). 3-bit fixed weights keep float32 activations (their
code extraction needs AVX-512 VBMI); the nested kernel serves 3-bit widths (its nibble rebuild puts
every width up to 4 bits one code to a byte). The prefill grouped GEMM is
:func:`moec.lower.schedules.x86_vnni_gemm.int8_grouped_gemm` on the same ISA, at 2, 4 and 8 bits, and the
nested one :func:`moec.lower.schedules.int8_nested_gemm.int8_nested_grouped_gemm` (:func:`dot` on its
unpacked code bytes: 0..15 up to 4 bits, recentred at 8).
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from tvm import tirx
from tvm.script import tirx as T

from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.nested_gemv import NestedGemvSpec
from moec.lower.schedules.int8_common import DotIsa, gfni_nibble_down, plain_select, splat
from moec.lower.schedules.int8_nested import int8_nested_gemv
from moec.lower.schedules.int8_nested_gemm import int8_nested_grouped_gemm
from moec.lower.schedules.x86_vnni import int8_gemv
from moec.lower.schedules.x86_vnni_gemm import int8_grouped_gemm

LANES = 8  # int32 rows per ymm register

#: Bit widths of fixed weights with AVX2 int8-activation kernels (the decode GEMV and the prefill grouped GEMM).
AVX2_BITS: tuple[int, ...] = (2, 4, 8)


def _pairs(u8, s8):
    """``vpmaddubsw``: int16 lane ``j`` = ``u8[2j]·s8[2j] + u8[2j+1]·s8[2j+1]`` (saturating)."""
    return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", u8, s8)


def quads(p, weight: int = 1):
    """``vpmaddwd`` against ``weight``: int32 lane ``i`` = ``weight · (p[2i] + p[2i+1])``."""
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", p, splat(weight, 16, "int16"))


def pairs(codes, x4):
    """int16 pair sums of ``codes`` bytes (0..15) times ``x4`` bytes (int8): at most 3810 a lane."""
    return _pairs(T.reinterpret("int8x32", codes), x4)


def dot(acc, codes, x4):
    """``acc`` plus, per lane, the 4 products of signed ``codes`` bytes and ``x4`` bytes (−127..127)."""
    c = T.reinterpret("int8x32", codes)
    signed_x = T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", x4, c)
    return acc + quads(_pairs(T.abs(c), signed_x))


def avx2_isa(claim_lanes: int = 0, expert_major_claims: bool = False, gfni: bool = False) -> DotIsa:
    """The AVX2 :class:`~moec.lower.schedules.int8_common.DotIsa`: 8 lanes, signed code bytes, plain selects,
    the two dot steps exposed (``pairs``, ``quads``) for int16 sums; ``gfni`` (Intel since Ice Lake and the
    Gracemont cores of N100-class chips, AMD since Zen 4): high nibbles moved down by one ``vgf2p8affineqb``."""
    return DotIsa(LANES, dot, plain_select(LANES), unsigned_codes=False, claim_lanes=claim_lanes,
                  expert_major_claims=expert_major_claims, nibble_down=gfni_nibble_down(LANES) if gfni else None,
                  pairs=pairs, quads=quads)


def avx2_gemv(spec: GemvSpec, params) -> tirx.PrimFunc:
    """The AVX2 int8-activation GEMV; ``params`` an :class:`~moec.lower.schedules.x86.X86Params` on 8 lanes
    (``x86.gemv_params`` of an AVX2 target)."""
    return int8_gemv(spec, params, avx2_isa())  # (claimed tasks: params.int8_claim_lanes, as on VNNI)


def avx2_nested_gemv(spec: NestedGemvSpec, params, gfni: bool = False) -> tirx.PrimFunc:
    """The AVX2 int8-activation nested GEMV (``int8_nested_tile_vectors``, ``int8_claim_lanes``,
    ``int8_expert_major_claims``; ``gfni``: :func:`avx2_isa`)."""
    return int8_nested_gemv(spec, avx2_isa(params.int8_claim_lanes, params.int8_expert_major_claims, gfni),
                            params.int8_nested_tile_vectors)


def avx2_grouped_gemm(spec, params) -> tirx.PrimFunc:
    """The AVX2 int8-activation prefill grouped GEMM (``gemm_vectors`` x ``gemm_tokens`` of ``params``, an AVX2
    target's :func:`~moec.lower.schedules.x86.gemv_params`)."""
    return int8_grouped_gemm(spec, params, avx2_isa())


def avx2_nested_grouped_gemm(spec, params, gfni: bool = False) -> tirx.PrimFunc:
    """The AVX2 int8-activation nested prefill grouped GEMM (``nested_gemm_block``, ``gemm_split`` of ``params``, an AVX2
    target's :func:`~moec.lower.schedules.x86.gemv_params`; ``gfni``: :func:`avx2_isa`)."""
    return int8_nested_grouped_gemm(spec, params, avx2_isa(gfni=gfni))
