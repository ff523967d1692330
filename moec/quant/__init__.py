"""Per-expert weight quantization: group-wise asymmetric numerics, bit packing and fake quantization."""

from moec.quant.fake import FLOAT_BITS, fake_quantize
from moec.quant.pack import pack, pack_zeros, packed_nbytes, packed_row_bytes, unpack
from moec.quant.quantize import (
    QUANT_METHODS,
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize,
    quantize,
)

__all__ = [
    "FLOAT_BITS",
    "QUANT_METHODS",
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "dequantize",
    "fake_quantize",
    "pack",
    "pack_zeros",
    "packed_nbytes",
    "packed_row_bytes",
    "quantize",
    "unpack",
]
