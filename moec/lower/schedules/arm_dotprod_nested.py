"""ARM dotprod (``sdot``) decode GEMV over nested (any-precision) expert stacks, int8 activations.

The kernel is :mod:`moec.lower.schedules.int8_nested` on 4 int32 lanes (128-bit NEON) with
``sdot`` (signed bytes both sides: odd nibble lanes shifted down, 8-bit codes recentred to
``q − 128``, as the fixed ARM kernel :mod:`moec.lower.schedules.arm_dotprod` does) and plain bit
selects (LLVM emits ``bsl``/``bit``/``bif``); TVM's static split of the tasks (the claimed-task loop
uses an x86 instruction). Unlike the fixed ARM int8 GEMV it serves 3-bit widths too: the nibble
rebuild puts any width up to 4 bits in one byte per code. ``dot=portable_dot`` runs it on any host.
"""

from collections.abc import Callable

from tvm import tirx
from tvm.script import tirx as T

from moec.lower.kernels.nested_gemv import NestedGemvSpec
from moec.lower.schedules.arm_dotprod import LANES, sdot
from moec.lower.schedules.int8_common import DotIsa, plain_select
from moec.lower.schedules.int8_nested import int8_nested_gemv


def dotprod_nested_gemv(spec: NestedGemvSpec, params, dot: Callable = sdot) -> tirx.PrimFunc:
    """The int8-activation nested GEMV for ``spec``; ``params`` an
    :class:`~moec.lower.schedules.arm.ArmParams` (``int8_nested_tile_vectors``); ``dot`` :func:`sdot` or
    :func:`~moec.lower.schedules.arm_dotprod.portable_dot`."""
    isa = DotIsa(LANES, lambda acc, codes, x4: dot(acc, T.reinterpret("int8x16", codes), x4), plain_select(LANES),
                 unsigned_codes=False)
    return int8_nested_gemv(spec, isa, params.int8_nested_tile_vectors)
