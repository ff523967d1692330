"""One widest TVMScript signature, less the parameters a variant does not take (kernels/signature.py)."""

import pytest
import tvm
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.signature import UNUSED, drop_params, segment_names


def _widest(second: bool):
    @T.prim_func
    def copy(a: T.Buffer((8,), "float32"), b: T.Buffer((8,) if second else UNUSED, "float32"),
             c: T.Buffer((8,), "float32")):
        T.func_attr({"global_symbol": "copy", "tirx.noalias": True})
        for i in range(8):
            c[i] = a[i] + b[i] if second else a[i]
    return copy


@T.prim_func
def _narrow(a: T.Buffer((8,), "float32"), c: T.Buffer((8,), "float32")):
    T.func_attr({"global_symbol": "copy", "tirx.noalias": True})
    for i in range(8):
        c[i] = a[i]


def test_dropping_equals_the_narrow_signature():
    tvm.ir.assert_structural_equal(drop_params(_widest(False), ["b"]), _narrow)
    assert [p.name for p in drop_params(_widest(False), ["b"]).params] == ["a", "c"]


def test_a_parameter_the_body_reads_is_refused():
    with pytest.raises(MoecError, match=r"reads the dropped parameters \['b'\]"):
        drop_params(_widest(True), ["b"])


def test_an_unknown_parameter_is_refused():
    with pytest.raises(MoecError, match=r"has no parameters \['d'\]"):
        drop_params(_widest(False), ["b", "d"])


def test_segment_names():
    assert segment_names(3) == ["seg3"]
    assert segment_names(4) == []
    assert segment_names(0, prefix="useg") == ["useg0", "useg1", "useg2", "useg3"]
    assert segment_names(3, suffix="_up") == ["seg3_up"]


@pytest.mark.parametrize("storage_bits, swiglu", [(8, False), (8, True), (4, False), (4, True)])
def test_nested_gemv_parameters(storage_bits, swiglu):
    """The int8 nested GEMV takes exactly its format's segments, and the up stack only in the SwiGLU form."""
    from moec.lower.kernels.nested_gemv import NestedGemvSpec
    from moec.lower.schedules import x86, x86_vnni_nested

    spec = NestedGemvSpec(storage_bits, 64, 256, 64, 4, 2, 64, swiglu=swiglu)
    names = [p.name for p in x86_vnni_nested.vnni_nested_gemv(spec, x86.PARAMS, portable=True).params]
    segs = [f"seg{s}" for s in range(4 if storage_bits == 8 else 3)]
    up = [f"{s}_up" for s in segs] + ["scale_up", "zero_up"] if swiglu else []
    assert names == ["x", *segs, "scale", "zero", *up, "prec", "expert_ids", "y"]
