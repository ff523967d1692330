"""Target-neutral TIR definitions of the decode GEMV: one output row per routed expert of one bit class."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx, topi

from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_SCALES, get_scale_format
from moec.lower.kernels.decode import code_at, extract
from moec.lower.kernels.layout import KERNEL_BITS, check_kernel_shape, num_tiles, zero_words

#: Bit widths with a float kernel: 16 = float16 weights, 32 = float32 weights.
FLOAT_KERNEL_BITS: tuple[int, ...] = (16, 32)


@dataclass(frozen=True)
class GemvSpec:
    """Shape of one GEMV kernel (one bit class).

    Attributes
    ----------
    bits : int
        2, 3, 4 or 8 (quantized, kernel layout of ``layout``), 16 or 32 (float weights).
    n, k : int
        ``out_features`` and ``in_features`` of every expert weight in the stack.
    group_size : int
        Quantization group size along K (unused for float weights).
    num_stacked : int
        Experts in this bit class' stack (``E_b``).
    top_k : int
        Routed experts computed per call (rows of ``expert_ids`` and of the output).
    tile : int
        Rows per tile of the kernel layout (the target family's choice, ``kernel_tile``).
    x_per_expert : bool
        ``x`` is ``[top_k, K]`` (one input per routed expert, e.g. the down projection) instead
        of one shared ``[1, K]`` vector.
    swiglu : bool
        Each stacked expert is ``[w1; w3]`` (``2n`` rows, see ``layout.swiglu_weight``) and the
        output is ``silu(w1 @ x) * (w3 @ x)`` ``[top_k, n]``: the gate and up projections in one
        pass.
    separate_up : bool
        With ``swiglu``: ``w1`` and ``w3`` are two stacks of ``n`` rows each, in the layout of the
        unfused GEMV (the kernel takes ``w3``'s arrays after ``w1``'s), instead of one ``[w1; w3]``
        stack, so a bundle's unfused weights serve the fused call as they are (int8-activation
        kernels only).
    scales : str
        Scale format (``moec.core.formats.SCALE_FORMATS``): ``fp16``, or ``u8`` (uint8 scale codes
        ``[E, NT, G, T]`` and float16 super-scales ``[E, NT, ceil(G/8), T]``: one more multiply
        per group).
    """

    bits: int
    n: int
    k: int
    group_size: int
    num_stacked: int
    top_k: int
    tile: int
    x_per_expert: bool = False
    swiglu: bool = False
    scales: str = DEFAULT_SCALES
    separate_up: bool = False

    def __post_init__(self) -> None:
        check_kernel_shape(self.bits, self.rows, self.k, self.group_size)
        get_scale_format(self.scales)
        if self.tile < 1 or (self.swiglu and not self.separate_up and self.n % self.tile):
            raise MoecError(f"bad tile {self.tile} (the SwiGLU GEMV needs n ({self.n}) to be a "
                            f"multiple of it, so w3's rows start a tile)")
        if self.separate_up and not self.swiglu:
            raise MoecError("separate_up is a form of the SwiGLU GEMV (swiglu=True)")
        if self.num_stacked < 1 or self.top_k < 1:
            raise MoecError(f"num_stacked ({self.num_stacked}) and top_k ({self.top_k}) must be >= 1")

    @property
    def quantized(self) -> bool:
        return self.bits in KERNEL_BITS

    @property
    def groups(self) -> int:
        return self.k // self.group_size

    @property
    def rows(self) -> int:
        """Rows of each stacked expert weight (``2n`` for SwiGLU's ``[w1; w3]``)."""
        return 2 * self.n if self.swiglu and not self.separate_up else self.n

    @property
    def super_groups(self) -> int:
        """Groups per super-scale (0: fp16 scales)."""
        return get_scale_format(self.scales).super_groups if self.quantized else 0


def _pow2(exponent: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``2**exponent`` for an integer exponent in [-126, 127], built from its bits."""
    return tirx.reinterpret("float32", ((exponent + 127) * (1 << 23)).astype("int32"))


def _x_row(spec: GemvSpec, j):
    return j if spec.x_per_expert else 0


def gemv_definition(spec: GemvSpec) -> tirx.PrimFunc:
    """Unscheduled, target-neutral GEMV ``y[j, :] = W[expert_ids[j]] @ x[j or 0]``.

    Quantized parameters, in order: ``x`` float32 ``[XR, K]`` (``XR`` = top_k or 1), ``weight``
    uint32 ``[E, NT, K*b/32, T]``, ``scale`` float16 ``[E, NT, G, T]`` (``u8`` scales: uint8 codes,
    then ``super_scale`` float16 ``[E, NT, ceil(G/8), T]``), ``zero`` uint32
    ``[E, NT, ZW, T]``, ``expert_ids`` int32 ``[top_k]``, ``y`` float32 ``[top_k, N]``.
    Float parameters: ``x``, ``weight`` ``[E, NT, K, T]`` (float16 or float32), ``expert_ids``,
    ``y``. (``T`` = ``spec.tile``, ``NT = ceil(N/T)``.) Only the experts named by
    ``expert_ids`` are read.

    The quantized form hoists dequantization out of the inner product (blocks ``xsum``, ``xs``,
    ``qdot``, ``y``)::

        y[j, n] = sum_g scale[n, g] * (sum_{i in g} q[n, i] * x[i] - zero[n, g] * xsum[g])

    and multiplies each code where it sits in its word: ``(w & mask << s) * (x[i] * 2**-s)``
    with ``xs[i] = x[i] * 2**-s`` (exact: powers of two), saving the shift.

    Parameters
    ----------
    spec : GemvSpec

    Returns
    -------
    tvm.tirx.PrimFunc
        Named ``gemv``; schedule it with the target family's ``schedule_gemv``.
    """
    if spec.separate_up:
        raise MoecError("the SwiGLU GEMV with separate w1/w3 stacks takes int8 activations only")
    return _quantized(spec) if spec.quantized else _float(spec)


def _common(spec: GemvSpec):
    xr = spec.top_k if spec.x_per_expert else 1
    x = te.placeholder((xr, spec.k), "float32", "x")
    ids = te.placeholder((spec.top_k,), "int32", "expert_ids")
    return x, ids


def _float(spec: GemvSpec) -> tirx.PrimFunc:
    tile, nt = spec.tile, num_tiles(spec.rows, spec.tile)
    dtype = "float16" if spec.bits == 16 else "float32"
    x, ids = _common(spec)
    w = te.placeholder((spec.num_stacked, nt, spec.k, tile), dtype, "weight")
    kk = te.reduce_axis((0, spec.k), "kk")
    y = te.compute(
        (spec.top_k, spec.rows),
        lambda j, n: te.sum(w[ids[j], n // tile, kk, n % tile].astype("float32")
                            * x[_x_row(spec, j), kk], axis=kk),
        name="y")
    return _finish(spec, [x, w, ids], y)


def _quantized(spec: GemvSpec) -> tirx.PrimFunc:
    bits, gs, tile = spec.bits, spec.group_size, spec.tile
    nt, groups = num_tiles(spec.rows, tile), spec.groups
    words_per_group = gs * bits // 32
    x, ids = _common(spec)
    w = te.placeholder((spec.num_stacked, nt, spec.k * bits // 32, tile), "uint32", "weight")
    sg = spec.super_groups
    scale = te.placeholder((spec.num_stacked, nt, groups, tile), "uint8" if sg else "float16", "scale")
    scale_args = [scale]
    if sg:
        sup = te.placeholder((spec.num_stacked, nt, -(-groups // sg), tile), "float16", "super_scale")
        scale_args.append(sup)
    zero = te.placeholder((spec.num_stacked, nt, zero_words(groups, bits), tile), "uint32", "zero")

    i = te.reduce_axis((0, gs), "i")
    xsum = te.compute((x.shape[0], groups),
                      lambda r, g: te.sum(x[r, g * gs + i], axis=i), name="xsum")

    # x pre-scaled by 2**-shift of the code it meets: a code masked in place (w & mask << s) is
    # q * 2**s exactly, so q * x costs and + convert + fma, with no shift (1.35x faster on x86
    # than shift + and + convert + fma); the products are bit-identical.
    xs = te.compute(x.shape, lambda r, c: x[r, c] * _pow2(-((c * bits) % 32)), name="xs")

    def qdot_fn(j, b, g, lane):
        def load(word):
            return w[ids[j], b, word, lane]
        shift = (ii * bits) % 32
        word = g * words_per_group + (ii * bits) // 32
        col = g * gs + ii
        inplace = (load(word) & (tirx.const((1 << bits) - 1, "uint32") << shift.astype("uint32")))
        term = inplace.astype("float32") * xs[_x_row(spec, j), col]
        if 32 % bits:  # a code straddling two words is shifted into place the usual way
            code = extract(load, word, shift, bits, straddle=True)
            shifted = code.astype("float32") * x[_x_row(spec, j), col]
            term = tirx.if_then_else(shift > 32 - bits, shifted, term)
        return te.sum(term, axis=ii)

    ii = te.reduce_axis((0, gs), "ii")
    qdot = te.compute((spec.top_k, nt, groups, tile), qdot_fn, name="qdot")

    def y_fn(j, n):
        b, lane = n // tile, n % tile
        zq = code_at(lambda word: zero[ids[j], b, word, lane], g, bits).astype("float32")
        s = scale[ids[j], b, g, lane].astype("float32")
        if sg:  # double-quantized: code times the super-block's fp16 scale, once per group
            s = s * sup[ids[j], b, g // sg, lane].astype("float32")
        return te.sum(s * (qdot[j, b, g, lane] - zq * xsum[_x_row(spec, j), g]), axis=g)

    g = te.reduce_axis((0, groups), "g")
    y = te.compute((spec.top_k, spec.rows), y_fn, name="y")
    return _finish(spec, [x, w] + scale_args + [zero, ids], y)


def _finish(spec: GemvSpec, inputs: list[te.Tensor], y: te.Tensor) -> tirx.PrimFunc:
    """The PrimFunc of ``y``, or of the SwiGLU ``h`` over ``y = [w1 x; w3 x]`` (block ``h``)."""
    if not spec.swiglu:
        return te.create_prim_func(inputs + [y]).with_attr("global_symbol", "gemv")
    n = spec.n
    neg = te.compute((spec.top_k, n), lambda j, c: -y[j, c], name="neg_gate")
    exp = topi.fast_exp(neg)  # vectorisable, unlike exp (a libm call per lane on x86)
    h = te.compute((spec.top_k, n),
                   lambda j, c: y[j, c] / (tirx.const(1, "float32") + exp[j, c]) * y[j, n + c], name="h")
    return te.create_prim_func(inputs + [h]).with_attr("global_symbol", "gemv")
