"""Weight formats: one registry of named formats (scheme, bits, scale/zero types, packing, kernels per backend).

A plan's integer bits *name* a format (``4`` is ``int4``; ``16`` is ``fp16``, the weight kept
in float), so existing plan JSON stays valid. Every list of allowed widths in moec derives
from this table: the quantizers (``QUANT_BITS``), plans and presets (``ALL_BITS``), the
default search space (``DEFAULT_ALLOWED``), the kernels each backend has (``kernel_bits``),
the int8-activation GEMVs and the ONNX operator each format exports to.

Adding a format (NF4, MXFP4, ...) is one entry here plus its numerics in ``moec.quant``; the
places that need new code then fail with this registry's one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.core.errors import MoecError

#: Scheme of a quantized format: ``w ≈ (q − zero) · scale`` per group along K (unsigned codes).
AFFINE = "affine"
#: The weight kept in floating point (no scale, no zero).
FLOAT = "float"


@dataclass(frozen=True)
class WeightFormat:
    """One storage format of a 2-D weight.

    Attributes
    ----------
    name : str
        ``int2`` … ``int8``, ``fp16``.
    bits : int
        Bits per weight code; the number a plan uses for this format.
    scheme : str
        ``affine`` (asymmetric integer with a zero point) or ``float``.
    scale_dtype, zero_dtype : str | None
        Per-group scale type with the default (``fp16``) scale format — a plan's ``scales``
        (:data:`SCALE_FORMATS`) says how the scales are stored — and zero-point storage
        (``packed``: ``bits``-wide codes, packed like the weights); None for float formats.
    packing : str
        ``lsb-stream``: value *i* of a row occupies bits ``[i·b, (i+1)·b)`` (``moec.quant.pack``);
        ``none`` for float formats (stored as float16).
    kernels : frozenset[str]
        Backends (``moec.lower.backends``) with a mixed-precision kernel for the format; on others
        the weight runs on the reference emitter.
    int8_activations : bool
        The CPU backends have an int8-activation GEMV for it (``--activations int8``).
    onnx_op : str
        How the ONNX export stores it: ``MatMulNBits`` (com.microsoft; 2/4/8 bits), ``packed``
        (moec's packed codes + a DequantizeLinear chain) or ``float16``.
    """

    name: str
    bits: int
    scheme: str
    scale_dtype: str | None
    zero_dtype: str | None
    packing: str
    kernels: frozenset[str]
    int8_activations: bool
    onnx_op: str

    @property
    def quantized(self) -> bool:
        return self.scheme != FLOAT


_ALL_BACKENDS = frozenset({"x86", "arm", "cuda"})
_CPU_BACKENDS = frozenset({"x86", "arm"})


def _int(bits: int, kernels: frozenset[str], onnx_op: str, int8_activations: bool = True) -> WeightFormat:
    return WeightFormat(f"int{bits}", bits, AFFINE, "float16", "packed", "lsb-stream", kernels,
                        int8_activations and bool(kernels), onnx_op)


#: Every format, keyed by the bits a plan uses to name it.
FORMATS: dict[int, WeightFormat] = {f.bits: f for f in (
    _int(2, _ALL_BACKENDS, "MatMulNBits"),
    _int(3, _ALL_BACKENDS, "packed"),
    _int(4, _ALL_BACKENDS, "MatMulNBits"),
    # float-activation kernels on CPU only (the generic straddling-code path, as at 3 bits)
    _int(5, _CPU_BACKENDS, "packed", int8_activations=False),
    _int(6, _CPU_BACKENDS, "packed", int8_activations=False),
    _int(8, _ALL_BACKENDS, "MatMulNBits"),
    WeightFormat("fp16", 16, FLOAT, None, None, "none", _ALL_BACKENDS, False, "float16"),
)}

#: Bits of the weight kept in float (the ``fp16`` format).
FLOAT_BITS = 16
#: Pseudo-width of an expert the plan drops (``dropped_experts``: 0 bytes, masked from the router). It is no
#: weight format: it appears only as a sensitivity column (``moec profile --bits 0,...``) and a search choice.
DROPPED_BITS = 0
#: Every width a plan or a target preset may name.
ALL_BITS: tuple[int, ...] = tuple(sorted(FORMATS))
#: Widths the quantizers produce (integer formats).
QUANT_BITS: tuple[int, ...] = tuple(b for b in ALL_BITS if FORMATS[b].quantized)
#: The search space when nothing narrower is given: formats every backend has kernels for.
DEFAULT_ALLOWED: tuple[int, ...] = tuple(b for b in ALL_BITS if FORMATS[b].kernels == _ALL_BACKENDS)
#: Integer widths with an int8-activation GEMV.
INT8_ACTIVATION_BITS: tuple[int, ...] = tuple(b for b in QUANT_BITS if FORMATS[b].int8_activations)
#: Integer widths the ONNX export writes as ``MatMulNBits``.
MATMULNBITS_BITS: tuple[int, ...] = tuple(b for b in QUANT_BITS if FORMATS[b].onnx_op == "MatMulNBits")


def kernel_bits(backend: str) -> tuple[int, ...]:
    """Integer widths ``backend`` has mixed-precision kernels for."""
    return tuple(b for b in QUANT_BITS if backend in FORMATS[b].kernels)


def get_format(spec: int | str) -> WeightFormat:
    """The format named by plan bits (``4``) or by name (``"int4"``); a one-line error lists the choices."""
    if isinstance(spec, str) and not spec.isdigit():
        for fmt in FORMATS.values():
            if fmt.name == spec:
                return fmt
    elif not isinstance(spec, bool):
        fmt = FORMATS.get(int(spec))
        if fmt is not None:
            return fmt
    raise MoecError(f"unknown weight format {spec!r}; choices: "
                    f"{', '.join(f'{f.name} ({b})' for b, f in FORMATS.items())}")


@dataclass(frozen=True)
class ScaleFormat:
    """How a quantized weight stores its per-group scales (a plan's ``scales``; every quantized weight
    of the plan uses it).

    Attributes
    ----------
    name : str
        ``fp16``: one float16 scale per group. ``u8``: *double-quantized* scales, one uint8 code
        ``c`` (1…255) per group and one float16 *super-scale* ``S`` per ``super_groups`` consecutive
        groups of a row (the last super-block of a row may be shorter); the group's scale is
        ``c · S`` in float32 (exact: an 8-bit integer times a float16 fits float32's mantissa).
    code_dtype : str
        numpy dtype of the per-group scale array (``float16`` or ``uint8``).
    super_groups : int
        Groups per super-scale (0: no super-scales).
    kernels : frozenset[str]
        Backends whose kernels read the format (others refuse it in one line).
    onnx_scales : str
        How the ONNX export writes the scales: ``native`` (the stored fp16 scales) or
        ``dequantized`` (``c · S`` as float32 per group: the ONNX file is larger than the bundle).
    """

    name: str
    code_dtype: str
    super_groups: int
    kernels: frozenset[str]
    onnx_scales: str

    @property
    def double_quantized(self) -> bool:
        return self.super_groups > 0

    def scale_bytes(self, rows: int, groups: int) -> int:
        """Bytes of the scales of ``rows`` rows of ``groups`` groups (codes + super-scales)."""
        if not self.double_quantized:
            return rows * groups * 2
        return rows * groups + rows * -(-groups // self.super_groups) * 2


#: Scale storage formats by name (plan ``scales``, ``--scales``).
SCALE_FORMATS: dict[str, ScaleFormat] = {f.name: f for f in (
    ScaleFormat("fp16", "float16", 0, _ALL_BACKENDS, "native"),
    # 8 groups per super-scale: 256 weights at group 32, llama.cpp's K-quant super-block
    ScaleFormat("u8", "uint8", 8, _CPU_BACKENDS, "dequantized"),
)}
#: The scale format plans use unless they say otherwise.
DEFAULT_SCALES = "fp16"


def get_scale_format(name: str) -> ScaleFormat:
    """The scale format ``name``; a one-line error lists the choices."""
    fmt = SCALE_FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise MoecError(f"unknown scale format {str(name)[:20]!r}; choices: {', '.join(SCALE_FORMATS)}")
    return fmt


@dataclass(frozen=True)
class NestedFormat:
    """Nested (any-precision) storage of a routed expert: stored once at ``storage_bits``, served at
    every width of ``derived_bits`` without re-quantizing.

    The ``storage_bits``-bit affine codes are split into bit-plane *segments*, most significant
    first, of ``segment_bits`` widths; segment ``s`` is needed by every width ``>= sum(widths[:s+1])``.
    Each segment is stored as its own LSB-first stream (``lsb-stream`` packing of a
    ``segment_bits[s]``-bit code), so a width-``k`` read touches exactly ``k / storage_bits`` of the
    code bytes. Derivation rule (``moec.quant.nested``, truncation to the top ``k`` bits, dequantized
    at the centre of the truncated bin): with ``s = storage_bits - k``,
    ``w_k = scale · (2**s · floor(q / 2**s) − zero + (2**s − 1) / 2)``, i.e. scale ``scale · 2**s``
    and the (fractional) zero ``(zero + 0.5) / 2**s − 0.5`` in k-bit units. ``k == storage_bits``
    is the stored weight itself.

    Attributes
    ----------
    name : str
        ``nested8``, ``nested4``.
    storage_bits : int
        Width the expert is quantized and stored at.
    segment_bits : tuple[int, ...]
        Widths of the bit-plane segments, most significant first (they sum to ``storage_bits``).
    kernels : frozenset[str]
        Backends with a run-time-precision kernel for it.
    """

    name: str
    storage_bits: int
    segment_bits: tuple[int, ...]
    kernels: frozenset[str]

    @property
    def derived_bits(self) -> tuple[int, ...]:
        """Widths this storage serves (each the sum of a prefix of the segments)."""
        out, total = [], 0
        for w in self.segment_bits:
            total += w
            out.append(total)
        return tuple(out)


#: Nested storage formats, keyed by storage bits (``moec compile --nested B``).
NESTED_FORMATS: dict[int, NestedFormat] = {f.storage_bits: f for f in (
    NestedFormat("nested8", 8, (2, 1, 1, 4), frozenset({"x86", "arm", "cuda"})),
    NestedFormat("nested4", 4, (2, 1, 1), frozenset({"x86", "arm", "cuda"})),
)}


def get_nested_format(storage_bits: int) -> NestedFormat:
    """The nested format stored at ``storage_bits``; a one-line error lists the choices."""
    fmt = NESTED_FORMATS.get(storage_bits) if isinstance(storage_bits, int) and not isinstance(
        storage_bits, bool) else None
    if fmt is None:
        raise MoecError(f"no nested storage at {storage_bits!r} bits; choices: "
                        f"{', '.join(str(b) for b in sorted(NESTED_FORMATS))}")
    return fmt
