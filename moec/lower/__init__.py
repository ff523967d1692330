"""Lowering to TVM: ONNX import, Relax decode graph, per-family phase pipelines, mixed-precision kernels."""

from moec.lower import tvmscript_speed

tvmscript_speed.install()
