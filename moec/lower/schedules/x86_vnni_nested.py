"""x86 AVX-512 VNNI decode GEMV over nested (any-precision) expert stacks, int8 activations.

The kernel is :mod:`moec.lower.schedules.int8_nested` on :func:`~moec.lower.schedules.x86_vnni.vnni_isa`: 16
int32 lanes, ``vpdpbusd`` (unsigned code bytes times signed activations: odd nibble lanes masked in place)
and ``vpternlogd`` bit selects; its tasks are claimed (``X86Params.int8_claim_lanes``). ``portable=True``
computes the same dots and selects in plain vector TIR (``x86_vnni.portable_dpbusd``), so tests check the
kernel's indexing and numerics on x86 hosts without AVX-512 VNNI. AVX2: ``x86_avx2.avx2_nested_gemv``.

The prefill's nested grouped GEMM with int8 activations is :mod:`moec.lower.schedules.int8_nested_gemm` on the
same ISA (:func:`vnni_nested_grouped_gemm`; AVX2: ``x86_avx2.avx2_nested_grouped_gemm``).
"""

from tvm import tirx

from moec.lower.kernels.nested_gemv import NestedGemvSpec
from moec.lower.kernels.nested_grouped import NestedGroupedSpec
from moec.lower.schedules.int8_nested import int8_nested_gemv
from moec.lower.schedules.int8_nested_gemm import int8_nested_grouped_gemm
from moec.lower.schedules.x86_vnni import vnni_isa


def vnni_nested_gemv(spec: NestedGemvSpec, params, portable: bool = False, gfni: bool = False) -> tirx.PrimFunc:
    """The int8-activation nested GEMV for ``spec``; ``params`` an
    :class:`~moec.lower.schedules.x86.X86Params` (``int8_nested_tile_vectors``, ``int8_nested_task_vectors``,
    ``int8_nested_block_vectors``, ``int8_nested_eight_one_chain``, ``int8_nested_word_order``,
    ``int8_claim_lanes``, ``int8_expert_major_claims``). ``portable``: the VNNI and ternary-logic instructions as
    plain TIR (tests on hosts without them); ``gfni``: the target has GFNI
    (:func:`~moec.lower.schedules.x86_vnni.vnni_isa`)."""
    isa = vnni_isa(portable, params.int8_claim_lanes, params.int8_expert_major_claims, gfni)
    return int8_nested_gemv(spec, isa, params.int8_nested_tile_vectors, params.int8_nested_task_vectors,
                            params.int8_nested_block_vectors, params.int8_nested_eight_one_chain,
                            params.int8_nested_word_order)


def vnni_nested_grouped_gemm(spec: NestedGroupedSpec, params, portable: bool = False,
                             gfni: bool = False) -> tirx.PrimFunc:
    """The int8-activation nested grouped GEMM for ``spec`` (``params.nested_gemm_block``, ``gemm_split``);
    ``portable``: the VNNI and ternary-logic instructions as plain TIR; ``gfni`` as for the GEMV."""
    return int8_nested_grouped_gemm(spec, params, vnni_isa(portable, gfni=gfni))
