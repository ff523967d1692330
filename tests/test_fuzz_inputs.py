"""Seeded mutations of plans, recipes, bundle manifests and configs: every outcome is a one-line
MoecError or a correct result, never an internal error, a traceback or a hang."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("moec_fuzz", Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


@pytest.mark.parametrize("parser", fuzz.PARSERS)
def test_mutations_give_clean_errors_or_correct_results(parser):
    rep = fuzz.run_fuzz(90, seed=18, parsers=(parser,))
    c = rep[parser]
    assert sum(c.values()) == 90
    assert c["internal"] == c["multiline"] == c["hang"] == 0, rep["examples"][:5]
    assert c["clean"] > 0 and c["ok"] > 0  # the fuzzer both breaks documents and leaves some valid
