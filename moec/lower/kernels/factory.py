"""Public kernel API: scheduled GEMV / grouped-GEMM PrimFuncs for a target, and their compilation."""

from __future__ import annotations

import tvm

from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_SCALES, INT8_ACTIVATION_BITS, get_scale_format
from moec.core.targets import load_target
from moec.lower.kernels.activations import ACTIVATIONS
from moec.lower.kernels.gemv import GemvSpec, gemv_definition
from moec.lower.kernels.grouped_gemm import GroupedGemmSpec, grouped_gemm_definition
from moec.lower.kernels.nested_gemv import NestedGemvSpec, guard_segments, nested_gemv_definition
from moec.lower.kernels.nested_grouped import NestedGroupedSpec, nested_grouped_definition
from moec.lower.kernels.row_guard import guard_routed_rows
from moec.lower.schedules import family_module, kernel_tile, target_family


def host_target() -> tvm.target.Target:
    """An LLVM target for this machine's CPU (its ISA extensions enabled): the ``host`` preset's."""
    return load_target("host").tvm()


def _check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise MoecError(f"unknown activations {activations!r}; choices: {', '.join(ACTIVATIONS)}")


def make_gemv(bits: int, n: int, k: int, group_size: int, num_stacked: int, top_k: int,
              target: tvm.target.Target, *, x_per_expert: bool = False,
              activations: str = "float32", swiglu: bool = False,
              scales: str = DEFAULT_SCALES, separate_up: bool = False) -> tvm.tirx.PrimFunc:
    """Decode GEMV for one bit class, scheduled for ``target``'s family.

    Parameters
    ----------
    bits : int
        2, 3, 4, 8 (quantized), 16 (float16 weights) or 32 (float32 weights).
    n, k : int
        ``out_features``, ``in_features`` of each expert weight.
    group_size : int
        Quantization group size: divides ``k``, ``group_size * bits % 32 == 0`` (ignored for
        float weights).
    num_stacked : int
        Experts in the bit class' stack.
    top_k : int
        Routed experts per call (length of ``expert_ids``, rows of ``y``).
    target : tvm.target.Target
        An LLVM CPU target; its family picks the schedule and the layout's row tile.
    x_per_expert : bool
        Take ``x [top_k, K]`` (one input per routed expert) instead of ``x [1, K]``.
    activations : str
        ``"float32"`` (exact; every bit width) or ``"int8"``: ``x`` quantized per group to int8
        inside the kernel (like onnxruntime's accuracy_level 4; 2/3/4/8 bits; families that have
        an int8 kernel, x86 with AVX-512 VNNI). See
        :func:`moec.lower.kernels.activations.quantize_activations`.
    swiglu : bool
        Fused gate/up projection: the stack holds ``[w1; w3]`` (``2n`` rows, from
        :func:`moec.lower.kernels.layout.swiglu_weight`) and the output is
        ``silu(w1 @ x) * (w3 @ x)`` ``[top_k, n]`` (float32 activations, or int8 on families with
        an int8 SwiGLU GEMV: x86 VNNI, whose rows with id -1 are written 0).
    scales : str
        Scale format (``moec.core.formats.SCALE_FORMATS``); ``u8`` (double-quantized) takes
        ``gemv(x, weight, scale, super_scale, zero, expert_ids, y)``, float32 activations only.

    separate_up : bool
        With ``swiglu`` and int8 activations: ``w1`` and ``w3`` as two stacks of ``n`` rows in the
        unfused layout, ``gemv(x, weight, scale, zero, weight_up, scale_up, zero_up, expert_ids, y)``
        (``u8``: each stack's ``super_scale`` after its ``scale``).

    Returns
    -------
    tvm.tirx.PrimFunc
        ``gemv(x, weight, scale, zero, expert_ids, y)`` (quantized) or
        ``gemv(x, weight, expert_ids, y)`` (float); arrays in the kernel layout of
        :func:`moec.lower.kernels.layout.to_kernel_layout` with ``tile=kernel_tile(target, n, bits, activations)``.
        When the family's schedule allows it (attribute ``moec.row_guard``, see
        :mod:`moec.lower.kernels.row_guard`) a row whose expert id is -1 is skipped: no weight is
        read and its output row is left unwritten.
    """
    target = tvm.target.Target(target)
    _check_activations(activations)
    spec = GemvSpec(bits, n, k, group_size, num_stacked, top_k, kernel_tile(target, n, bits, activations),
                    x_per_expert, swiglu, scales, separate_up)
    family = family_module(target)
    _check_scales(scales, target, activations)
    if activations == "int8":
        if bits not in INT8_ACTIVATION_BITS:
            raise MoecError(f"int8 activations need quantized weights: bits "
                            f"{', '.join(map(str, INT8_ACTIVATION_BITS))}, not {bits}")
        if not hasattr(family, "int8_gemv"):
            raise MoecError(f"no int8-activation GEMV for target family {target_family(target)!r}")
        return family.int8_gemv(spec, target)
    return guard_routed_rows(family.schedule_gemv(gemv_definition(spec), spec, family.gemv_params(target)), top_k)


def make_grouped_gemm(bits: int, n: int, k: int, group_size: int, num_stacked: int,
                      target: tvm.target.Target, activations: str = "float32",
                      scales: str = DEFAULT_SCALES, layout_activations: str | None = None) -> tvm.tirx.PrimFunc:
    """Prefill grouped GEMM for one bit class, scheduled for ``target``'s family.

    Parameters
    ----------
    bits, n, k, group_size, num_stacked, target, activations
        As for :func:`make_gemv` (``"int8"``: quantized weights, families with an int8 grouped
        GEMM: x86 with AVX-512 VNNI).
    layout_activations : str, optional
        The activations of the weight's decode GEMV, whose layout tile (``kernel_tile``) the GEMM reads
        (default ``activations``): an AVX2 host's float32 prefill reads 2- and 4-bit weights laid out
        for its int8 decode GEMV.

    Returns
    -------
    tvm.tirx.PrimFunc
        float32 activations: ``grouped_gemm(x, weight, scale, zero, offsets, y)`` (quantized) or
        ``grouped_gemm(x, weight, offsets, y)`` (float): ``x`` float32 ``[T, K]`` holds the routed
        tokens sorted by stacked expert, rows ``offsets[e]:offsets[e+1]`` (int32
        ``[num_stacked + 1]``) going to expert ``e``; ``y`` float32 ``[T, N]`` row ``t`` is
        ``x[t] @ W[e].T``. ``T`` is a symbolic dimension (any number of tokens).
        int8 activations: ``grouped_gemm(x, rows, weight, scale, zero, offsets, y)``: ``x``
        float32 ``[R, K]`` unsorted (each row quantized once), ``rows`` int32 ``[P]`` the row of
        ``x`` of each sorted pair, ``y`` ``[P, N]`` (see
        :mod:`moec.lower.schedules.x86_vnni_gemm`).
    """
    family = family_module(target)
    _check_activations(activations)
    tile = kernel_tile(target, n, bits, layout_activations or activations)
    spec = GroupedGemmSpec(bits, n, k, group_size, num_stacked, tile, scales)
    _check_scales(scales, tvm.target.Target(target), activations)
    if activations == "int8":
        if bits not in INT8_ACTIVATION_BITS:
            raise MoecError(f"int8 activations need quantized weights: bits "
                            f"{', '.join(map(str, INT8_ACTIVATION_BITS))}, not {bits}")
        if not hasattr(family, "int8_grouped_gemm"):
            raise MoecError(f"no int8-activation grouped GEMM for target family {target_family(target)!r}")
        return family.int8_grouped_gemm(spec, tvm.target.Target(target))
    return grouped_gemm_definition(spec, family.grouped_gemm_params())


def _check_scales(scales: str, target: tvm.target.Target, activations: str) -> None:
    """One-line refusal of a scale format the target family has no kernel for."""
    fmt = get_scale_format(scales)
    if target_family(target) not in fmt.kernels:
        raise MoecError(f"no kernel reads '{scales}' scales on target family {target_family(target)!r}; "
                        f"choices: {', '.join(sorted(fmt.kernels))}")


def compile_kernel(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> tvm.runtime.Module:
    """Compile one kernel PrimFunc to a runnable module (call it as ``mod[name](*tensors)``)."""
    return tvm.compile(tvm.IRModule({func.attrs["global_symbol"]: func}), target=target)


def make_nested_gemv(storage_bits: int, n: int, k: int, group_size: int, num_stacked: int, top_k: int,
                     target: tvm.target.Target, *, x_per_expert: bool = False,
                     activations: str = "float32", swiglu: bool = False) -> tvm.tirx.PrimFunc:
    """Decode GEMV over a nested expert stack whose per-expert width is a run-time argument.

    Returns ``gemv(x, seg0, …, scale, zero, prec, expert_ids, y)`` scheduled for ``target``'s family
    (see :mod:`moec.lower.kernels.nested_gemv`; arrays from
    :func:`moec.lower.kernels.layout.nested_kernel_layout`), with the segment and row guards.
    ``activations="int8"``: ``x`` quantized per group to int8 inside the kernel, as :func:`make_gemv`'s
    int8 kernels do (families with an int8 nested GEMV: x86 with AVX-512 VNNI,
    :mod:`moec.lower.schedules.x86_vnni_nested`); same arguments. ``swiglu`` (int8 only): the gate's stack
    arrays, then the up's, ``gemv(x, seg0, …, scale, zero, seg0_up, …, scale_up, zero_up, prec, expert_ids, y)``
    with ``y = silu(gate x) * (up x)`` (:class:`~moec.lower.kernels.nested_gemv.NestedGemvSpec`).
    """
    target = tvm.target.Target(target)
    _check_activations(activations)
    if swiglu and activations != "int8":
        raise MoecError("the nested SwiGLU GEMV takes int8 activations")
    spec = NestedGemvSpec(storage_bits, n, k, group_size, num_stacked, top_k, kernel_tile(target, n, None, activations),
                          x_per_expert, swiglu)
    family = family_module(target)
    if activations == "int8":
        if not hasattr(family, "int8_nested_gemv"):
            raise MoecError(f"no int8-activation nested GEMV for target family {target_family(target)!r}")
        return family.int8_nested_gemv(spec, target)
    func = family.schedule_nested_gemv(nested_gemv_definition(spec), spec, family.gemv_params(target))
    return guard_routed_rows(guard_segments(func, spec), top_k)


def add_kernel(bb, func: tvm.tirx.PrimFunc, sym: str):
    """Add a scheduled kernel to the module ``bb`` builds, once, under ``sym`` (opaque: called as it is,
    never fused with neighbouring ops); a structurally equal kernel added again returns the existing
    function, so layers of one shape share one compiled kernel. ``sym`` must name everything that makes
    two kernels differ: a different kernel under a taken symbol is an internal error, not a rename."""
    gv = bb.add_func(func.with_attr("op_pattern", 8).with_attr("global_symbol", sym), sym)
    if gv.name_hint != sym:
        raise MoecError(f"internal: kernel symbol {sym} is not unique ({gv.name_hint})")
    return gv


def make_nested_grouped_gemm(storage_bits: int, n: int, k: int, group_size: int, num_stacked: int,
                             target: tvm.target.Target, layout_activations: str = "float32", *,
                             activations: str = "float32") -> tvm.tirx.PrimFunc:
    """Prefill grouped GEMM over a nested expert stack whose per-expert width is a run-time argument.

    Returns ``grouped_gemm(x, seg0, …, scale, zero, prec, offsets, y)`` with the loops of ``target``'s
    family (its ``grouped_gemm_params``, as for :func:`make_grouped_gemm`); arrays from
    :func:`moec.lower.kernels.layout.nested_kernel_layout`, ``x``/``offsets``/``y`` as for
    :func:`make_grouped_gemm` (see :mod:`moec.lower.kernels.nested_grouped`). ``layout_activations`` are
    those of the stack's decode GEMV, whose layout tile it reads. ``activations="int8"``:
    ``grouped_gemm(x, rows, seg0, …, scale, zero, prec, offsets, y)``, each row of ``x`` quantized once and
    gathered by ``rows`` as :func:`make_grouped_gemm`'s int8 kernels do (families with one: x86 with
    AVX-512 VNNI or AVX2, :mod:`moec.lower.schedules.int8_nested_gemm`).
    """
    target = tvm.target.Target(target)
    _check_activations(activations)
    family = family_module(target)
    spec = NestedGroupedSpec(storage_bits, n, k, group_size, num_stacked, kernel_tile(target, n, None, layout_activations))
    if activations == "int8":
        if not hasattr(family, "int8_nested_grouped_gemm"):
            raise MoecError(f"no int8-activation nested grouped GEMM for target family {target_family(target)!r}")
        return family.int8_nested_grouped_gemm(spec, target)
    return nested_grouped_definition(spec, family.grouped_gemm_params())
