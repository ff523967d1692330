"""The weight-format registry: the one source of every bit-width list, and plan bits naming formats."""

from __future__ import annotations

import pytest

from moec.core import formats
from moec.core.errors import MoecError
from moec.core.formats import FORMATS, get_format, kernel_bits
from moec.core.plan import BitPlan
from moec.core.targets import TargetPreset
from moec.export.quantized_matmul import MATMULNBITS_BITS
from moec.lower.kernels.layout import KERNEL_BITS
from moec.quant.pack import packed_nbytes
from moec.quant.quantize import SUPPORTED_BITS


def test_plan_bits_name_formats():
    assert get_format(4) is get_format("int4") is FORMATS[4]
    assert get_format(16).name == "fp16" and not get_format(16).quantized
    assert all(f.bits == b and f.name.endswith(str(b)) for b, f in FORMATS.items())
    with pytest.raises(MoecError, match="unknown weight format 7; choices: int2 \\(2\\), int3 \\(3\\)"):
        get_format(7)
    with pytest.raises(MoecError, match="unknown weight format 'nf4'"):
        get_format("nf4")


def test_every_width_list_derives_from_the_registry():
    assert formats.ALL_BITS == (2, 3, 4, 5, 6, 8, 16)
    assert SUPPORTED_BITS == formats.QUANT_BITS == (2, 3, 4, 5, 6, 8)
    assert formats.DEFAULT_ALLOWED == (2, 3, 4, 8, 16)
    assert KERNEL_BITS == kernel_bits("x86") == kernel_bits("arm") == (2, 3, 4, 5, 6, 8)
    assert kernel_bits("cuda") == (2, 3, 4, 8)  # int5/int6: CPU kernels only, so not in DEFAULT_ALLOWED
    assert MATMULNBITS_BITS == (2, 4, 8) and formats.INT8_ACTIVATION_BITS == (2, 3, 4, 8)


def test_affine_formats_store_what_accounting_counts():
    for bits in formats.QUANT_BITS:
        fmt = FORMATS[bits]
        assert fmt.scheme == formats.AFFINE and fmt.scale_dtype == "float16" and fmt.zero_dtype == "packed"
        # 64 x 128 weight, groups of 32: packed codes, fp16 scales, packed zeros
        nb = packed_nbytes(64, 128, bits, 32)
        assert nb == {"weight": 64 * 128 * bits // 8, "scales": 64 * 4 * 2, "zeros": 64 * -(-4 * bits // 8),
                      "total": nb["weight"] + nb["scales"] + nb["zeros"]}
    assert packed_nbytes(64, 128, 16, 32)["total"] == 64 * 128 * 2


def test_plans_and_presets_accept_exactly_the_registry():
    cfg_bits = {0: {0: 5}}
    assert BitPlan.from_json({"version": 1, "model_fingerprint": "f" * 16, "experts": {"0": {"0": 5}}}).experts == cfg_bits
    fields = dict(name="t", family="cpu", tvm_target={"kind": "llvm"}, rpc_key="k", memory_budget_mb=1,
                  energy_model={"pj_per_byte": 1, "pj_per_op": 1, "source": "s"})
    assert TargetPreset(**fields, allowed_bits=list(formats.ALL_BITS)).allowed_bits == list(formats.ALL_BITS)
    with pytest.raises(ValueError, match="unsupported bits \\[7\\]; choose from 2, 3, 4, 5, 6, 8, 16"):
        TargetPreset(**fields, allowed_bits=[4, 7])
