"""The faster TVMScript macro parser lookup: installed, and it parses macros exactly as TVM's own does."""

from __future__ import annotations

import pytest
import tvm
from tvm.script import tirx as T
from tvm.script.parser.core.parser import ScriptMacro

import moec.lower  # noqa: F401  (installs the lookup)
from moec.lower import tvmscript_speed


def _parse():
    """A prim_func whose body calls a macro twice, nested in loops (the shape of moec's kernels)."""

    @T.macro
    def axpy(out, a, x, i):
        out[i] = out[i] + a * x[i]

    @T.prim_func(private=True)
    def func(a: T.handle, x: T.handle, out: T.handle):
        A = T.match_buffer(a, (1,), "float32")
        X = T.match_buffer(x, (16,), "float32")
        O = T.match_buffer(out, (16,), "float32")
        for i in range(16):
            axpy(O, A[0], X, i)
            axpy(O, A[0] * T.float32(2), X, i)

    return func


def test_installed_when_moec_lower_is_imported():
    assert ScriptMacro._find_parser_def is tvmscript_speed._find_parser_def
    assert tvmscript_speed.install()  # again: TVM's own lookup is still the one kept
    assert tvmscript_speed.tvm_find_parser_def.__module__ == "tvm.script.parser.core.parser"


def test_macro_parses_the_same_as_with_tvms_lookup(monkeypatch):
    fast = _parse()
    monkeypatch.setattr(ScriptMacro, "_find_parser_def", tvmscript_speed.tvm_find_parser_def)  # TVM's own
    reference = _parse()
    tvm.ir.assert_structural_equal(fast, reference, map_free_vars=True)
    assert fast.script().count("O[i] = O[i] + A") == 2  # both macro calls expanded in place


def test_macro_outside_a_parse_is_an_error():
    @T.macro
    def noop():
        T.evaluate(0)

    with pytest.raises(RuntimeError, match="__current_script_parser__ not available"):
        noop()
