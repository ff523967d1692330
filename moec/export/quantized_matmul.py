"""ONNX forms of one packed weight (per bit-width) and the nodes that multiply or look up through it.

Every 2-D weight ``W [N, K]`` (``y = x @ W.T``) is stored once, in the form its bits allow,
and never as a float copy of a quantized weight:

``matmulnbits`` (2, 4 and 8 bits, ``group_size`` a power of two >= 16)
    onnxruntime's ``com.microsoft.MatMulNBits`` with attributes ``K, N, bits``,
    ``block_size = group_size`` and ``accuracy_level`` (default 0: float32 compute, so results
    match ``PackedWeight.dequantize()`` to float32 rounding; onnxruntime 1.32 has a fast fp32
    kernel only for 4 bits and dequantizes whole 2/8-bit matrices per call at level 0. Level 4
    quantizes the activations to int8 per block: fast for all three widths, ~1e-2 relative
    error, so it is an explicit export option). Initializers: ``B`` = the packed rows
    reshaped to ``[N, K/block, block*bits/8]`` (moec's LSB-first layout *is* its layout),
    ``scales`` = float32 ``[N*K/block]`` (the fp16 scales widened exactly: the kernel wants
    the activation type) and ``zero_points`` = the packed zeros flattened, uint8.

``packed`` (3, 5 and 6 bits, or any width whose group size MatMulNBits refuses)
    Initializers hold exactly moec's packed layout: uint8 ``[N, ceil(K*bits/8)]`` codes,
    float16 ``[N, G]`` scales, uint8 ``[N, ceil(G*bits/8)]`` zeros. The graph unpacks codes and
    zeros to uint8 with standard uint8 ops (see :func:`unpack_codes`: Pad, Reshape to chunks of
    ``bits`` bytes, Gather of constant byte indices, BitShift, BitwiseOr, BitwiseAnd), then a
    blocked ``DequantizeLinear(q, Cast(scale), zero, axis=1, block_size=group_size)`` (opset 21)
    gives ``W = (q - zero) * scale``, bit-exact with ``PackedWeight.dequantize()``, and
    ``Gemm(x, W, transB=1)``. onnxruntime 1.32 constant-folds the uint8 unpack at session
    creation (in memory the weight becomes 8-bit codes, never float) and, as with any QDQ
    pattern, keeps ``DequantizeLinear`` as a runtime op, so a routed 3/5/6-bit expert is
    dequantized when it runs. A back end that keeps weights packed matches the one unpack
    chain per weight.

Double-quantized scales (plan ``scales: u8``) have no ONNX operator: both forms then store each
group's scale dequantized, ``code · super_scale`` as float32 ``[N, G]`` (exact, so the graph still
equals ``PackedWeight.dequantize()``), and the ONNX file is larger than the bundle (4 bytes per group
instead of 1 + 2 per 8 groups). ``moec build`` refuses such a file (the codes cannot be recovered).

``float16`` (16 bits)
    float16 initializer ``[N, K]``, ``Cast`` to float, ``Gemm(transB=1)``.

``float32``
    float32 initializer (only for the FP32 baseline of benchmarks; never chosen by a plan).

Embedding lookups gather *rows* of the stored tensors by token id (``B``/packed codes,
scales, zeros; the flat MatMulNBits tensors are reshaped to ``[V, ...]`` first) and dequantize
only those rows, so a quantized or tied embedding is never expanded in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from moec.core.formats import FLOAT_BITS, MATMULNBITS_BITS
from moec.export.onnx_graph import MS_DOMAIN, GraphBuilder, WeightStore
from moec.quant.pack import packed_row_bytes
from moec.quant.packed_model import PackedWeight

@dataclass(frozen=True)
class StoredWeight:
    """How one ``[N, K]`` weight lives in the graph: its form and initializer names."""

    name: str
    form: str            # "matmulnbits" | "packed" | "float16" | "float32"
    bits: int
    n: int
    k: int
    group_size: int
    data: str            # codes / float weight initializer
    scale: str | None = None
    zero: str | None = None
    accuracy_level: int = 0

    @property
    def groups(self) -> int:
        return self.k // self.group_size


def choose_form(pw: PackedWeight) -> str:
    if pw.bits == FLOAT_BITS:
        return "float32" if pw.packed.dtype == np.float32 else "float16"
    gs = pw.group_size
    if pw.bits in MATMULNBITS_BITS and gs >= 16 and gs & (gs - 1) == 0:
        return "matmulnbits"
    return "packed"


def store_weight(store: WeightStore, name: str, pw: PackedWeight, accuracy_level: int = 0) -> StoredWeight:
    """Add ``pw``'s arrays to the weight store in the form its bits allow."""
    n, k = pw.shape
    form = choose_form(pw)
    if form in ("float16", "float32"):
        return StoredWeight(name, form, pw.bits, n, k, pw.group_size, store.add(name, pw.packed))
    g = k // pw.group_size
    if form == "matmulnbits":
        blob = pw.group_size * pw.bits // 8
        data = store.add(f"{name}.qweight", pw.packed.reshape(n, g, blob))
        scale = store.add(f"{name}.scales", pw.float_scales().reshape(-1))
        zero = store.add(f"{name}.qzeros", pw.zero.reshape(-1))
    else:
        data = store.add(f"{name}.qweight", pw.packed)
        # fp16 scales as stored; double-quantized ones dequantized to float32 (no ONNX form for the codes)
        scale = store.add(f"{name}.scales", pw.scale if pw.super_scale is None else pw.float_scales())
        zero = store.add(f"{name}.qzeros", pw.zero)
    return StoredWeight(name, form, pw.bits, n, k, pw.group_size, data, scale, zero, accuracy_level)


def linear(gb: GraphBuilder, x: str, w: StoredWeight, bias: str | None = None) -> str:
    """``x [T, K] @ W.T (+ bias)`` -> ``[T, N]`` through the weight's form."""
    with gb.meta(weight=w.name, bits=w.bits, form=w.form):
        if w.form == "matmulnbits":
            y = gb.op("MatMulNBits", [x, w.data, w.scale, w.zero], domain=MS_DOMAIN, K=w.k, N=w.n,
                      bits=w.bits, block_size=w.group_size, accuracy_level=w.accuracy_level)
            return gb.op("Add", [y, bias]) if bias else y
        if w.form == "float32":
            mat = w.data
        elif w.form == "float16":
            mat = gb.op("Cast", [w.data], to=TensorProto.FLOAT)
        else:
            mat = dequant_rows(gb, w.data, w.scale, w.zero, w)
        return gb.op("Gemm", [x, mat] + ([bias] if bias else []), transB=1)


def embedding(gb: GraphBuilder, ids: str, w: StoredWeight) -> str:
    """Rows ``W[ids]`` as float32 ``[T, K]``, dequantizing only the gathered rows."""
    with gb.meta(weight=w.name, bits=w.bits, form=w.form):
        if w.form in ("float16", "float32"):
            rows = gb.op("Gather", [w.data, ids], axis=0)
            return rows if w.form == "float32" else gb.op("Cast", [rows], to=TensorProto.FLOAT)
        data, scale, zero = w.data, w.scale, w.zero
        if w.form == "matmulnbits":  # flat/blocked MatMulNBits tensors viewed as [V, ...] rows
            data = gb.op("Reshape", [data, gb.i64(w.n, packed_row_bytes(w.k, w.bits))])
            scale = gb.op("Reshape", [scale, gb.i64(w.n, w.groups)])
            zero = gb.op("Reshape", [zero, gb.i64(w.n, packed_row_bytes(w.groups, w.bits))])
        rows = [gb.op("Gather", [t, ids], axis=0) for t in (data, scale, zero)]
        return dequant_rows(gb, *rows, w)


def dequant_rows(gb: GraphBuilder, data: str, scale: str, zero: str, w: StoredWeight) -> str:
    """Blocked ``DequantizeLinear`` of packed rows ``[R, ceil(K*b/8)]`` -> float32 ``[R, K]``.

    ``(q - zero) * scale`` per group of ``group_size`` along K: exactly ``PackedWeight.dequantize()``.
    """
    q = unpack_codes(gb, data, w.bits, w.k)                      # uint8 [R, K]
    z = unpack_codes(gb, zero, w.bits, w.groups)                 # uint8 [R, G]
    s = gb.op("Cast", [scale], to=TensorProto.FLOAT)             # [R, G]
    return gb.op("DequantizeLinear", [q, s, z], axis=1, block_size=w.group_size)


def unpack_codes(gb: GraphBuilder, packed: str, bits: int, count: int) -> str:
    """Unpack uint8 rows ``[R, ceil(count*bits/8)]`` (LSB-first stream) to uint8 codes ``[R, count]``.

    Every 8 values of ``bits`` bits fill ``bits`` bytes, so each row is viewed as chunks of
    ``bits`` bytes; value ``i`` of a chunk starts at bit ``i*bits``: byte ``lo = i*bits // 8``,
    shift ``sh = i*bits % 8``. Then ``code = ((byte[lo] >> sh) | (byte[lo+1] << (8 - sh))) & mask``
    (uint8 arithmetic, so the left shift drops the bits above 8), all 8 values at once with a
    ``Gather`` of constant byte indices. A value that does not spill into the next byte reads
    ``byte[lo] << bits`` as its "high" part, whose low ``bits`` bits are zero.
    """
    if bits == 8:
        return packed
    chunks = -(-count // 8)
    have, need = packed_row_bytes(count, bits), chunks * bits
    if need > have:  # zero-pad the last partial chunk of each row
        packed = gb.op("Pad", [packed, gb.i64(0, 0, 0, need - have), gb.const(np.uint8(0))], mode="constant")
    b3 = gb.op("Reshape", [packed, gb.i64(-1, chunks, bits)])
    start = np.arange(8) * bits
    lo, sh = start // 8, start % 8
    spill = sh + bits > 8
    codes = gb.op("BitShift", [gb.op("Gather", [b3, gb.const(lo.astype(np.int64))], axis=2),
                               gb.const(sh.astype(np.uint8))], direction="RIGHT")
    if spill.any():
        hi_idx = np.where(spill, lo + 1, lo).astype(np.int64)
        hi_shift = np.where(spill, 8 - sh, bits).astype(np.uint8)
        hi = gb.op("BitShift", [gb.op("Gather", [b3, gb.const(hi_idx)], axis=2), gb.const(hi_shift)],
                   direction="LEFT")
        codes = gb.op("BitwiseOr", [codes, hi])
    codes = gb.op("BitwiseAnd", [codes, gb.const(np.uint8((1 << bits) - 1))])
    flat = gb.op("Reshape", [codes, gb.i64(-1, chunks * 8)])
    if chunks * 8 != count:
        flat = gb.op("Slice", [flat, gb.i64(0), gb.i64(count), gb.i64(1)])
    return flat
