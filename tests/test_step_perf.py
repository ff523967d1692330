"""benchmarks/step_perf.py's attribution of perf samples: a deleted lib.so's addresses are named by
the bundle's own symbols, TVM's wrapper and body symbols fold into one kernel, libraries into groups.
No perf is run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("moec_step_perf", BENCH / "step_perf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REPORT = """\
# Samples: 13K of event 'cpu-clock:ppp'
#
    40.00%  lib.so (deleted)                                   [.] 0x0000000000015010
    10.00%  lib.so (deleted)                                   [.] 0x0000000000014e60
     5.00%  lib.so                                             [.] gemv_b4_compute_
    20.00%  lib.so (deleted)                                   [.] 0x0000000000016240
    12.00%  [kernel.kallsyms]                                  [k] do_sched_yield
     6.00%  libtvm_runtime.so                                  [.] tvm::runtime::WorkspacePool::Pool::Free
     3.00%  libtvm_ffi.so                                      [.] 0x0000000000203af2
     2.00%  libc.so.6                                          [.] __sched_yield
     1.00%  libpython3.11.so.1.0                               [.] _PyEval_EvalFrameDefault
     1.00%  _multiarray_umath.cpython-311-x86_64-linux-gnu.so  [.] PyUFunc_AddLoop
"""


def test_samples_are_named_by_the_bundle_symbols_and_grouped():
    mod = _load()
    addrs = [0x14E50, 0x14F00, 0x16230]
    names = ["__tvm_ffi_gemv_b4", "gemv_b4_compute_", "attention_compute_"]
    shares = mod.attribute(REPORT, addrs, names)
    assert shares == pytest.approx({"gemv_b4": 55.0, "attention": 20.0, "OS": 12.0, "TVM runtime": 9.0,
                                    "libc": 2.0, "Python": 1.0, "other": 1.0})


def test_kernel_name_folds_wrapper_and_body():
    mod = _load()
    assert mod.kernel_name("__tvm_ffi_rms_norm") == mod.kernel_name("rms_norm_compute_") == "rms_norm"
