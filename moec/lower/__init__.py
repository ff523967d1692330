"""Lowering to TVM: ONNX import, Relax decode graph, per-family phase pipelines, mixed-precision kernels."""
