"""Mixed-precision MoE kernels in TIR: kernel layout (``layout``), GEMV and grouped-GEMM definitions, ``factory``.

Import from the submodules (``moec.lower.kernels.factory.make_gemv``, ``...layout.to_kernel_layout``):
the schedules import ``layout`` and ``factory`` imports the schedules, so this package re-exports nothing.
"""
