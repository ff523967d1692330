"""Mixed-precision MoE kernels in TIR: kernel layout, GEMV and grouped-GEMM definitions, build API."""

from __future__ import annotations

import importlib

# Re-exported lazily (PEP 562): the schedule modules import kernels.decode/layout, and an eager
# import of ``factory`` here (which imports the schedule registry) would make that a cycle.
_EXPORTS = {
    "compile_kernel": "factory", "host_target": "factory", "make_gemv": "factory",
    "make_grouped_gemm": "factory", "from_kernel_layout": "layout",
    "stack_kernel_layouts": "layout", "swiglu_weight": "layout", "to_kernel_layout": "layout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
