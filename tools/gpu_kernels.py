"""Routed-expert fused dequantize-GEMV of moec's CUDA backend on OLMoE-shaped experts: GPU GB/s per bit width."""

from __future__ import annotations

import numpy as np

#: OLMoE-1B-7B expert projection (gate/up: [1024, 2048]), 64 experts, top-8, group 64.
SHAPE = {"n": 1024, "k": 2048, "experts": 64, "top_k": 8, "group": 64}


def expert_gemv_module(bits: int, n: int, k: int, experts: int, top_k: int, group: int):
    """Relax ``main(x, packed, scale, zero, ids)``: the backend's routed-expert GEMV (as a decode step emits it)."""
    import tvm
    from tvm import relax

    from moec.lower.gpu_linear import expert_dequant_gemv
    groups = k // group
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, k), "float32"))
    packed = relax.Var("packed", relax.TensorType((experts, n, k * bits // 8), "uint8"))
    scale = relax.Var("scale", relax.TensorType((experts, n, groups), "float16"))
    zero = relax.Var("zero", relax.TensorType((experts, n, -(-groups * bits // 8)), "uint8"))
    ids = relax.Var("ids", relax.TensorType((top_k,), "int32"))
    with bb.function("main", [x, packed, scale, zero, ids]):
        with bb.dataflow():
            y = bb.emit_te(expert_dequant_gemv, x, packed, scale, zero, ids, bits, n, k, group,
                           primfunc_name_hint="expert_dequant_gemv")
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    assert isinstance(mod, tvm.IRModule)
    return mod


def routed_bytes(bits: int, n: int, k: int, top_k: int, group: int, **_) -> int:
    """Bytes one call reads from the weights: ``top_k`` experts' packed codes, fp16 scales and zeros."""
    from moec.quant.pack import packed_nbytes
    return top_k * packed_nbytes(n, k, bits, group)["total"]


def build(bits: int, target, shape: dict = SHAPE):
    """The compiled executable for ``target`` (a CUDA ``tvm.target.Target``)."""
    import tvm

    from moec.lower.pipeline import CUDA_PHASES, make_pipeline
    mod = expert_gemv_module(bits, **shape)
    with target:
        return tvm.compile(mod, target=target, relax_pipeline=make_pipeline(CUDA_PHASES))


def inputs(bits: int, n: int, k: int, experts: int, top_k: int, group: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    groups = k // group
    return [rng.standard_normal((1, k)).astype(np.float32),
            rng.integers(0, 256, (experts, n, k * bits // 8), dtype=np.uint8),
            (rng.random((experts, n, groups), dtype=np.float32) * 0.01).astype(np.float16),
            rng.integers(0, 256, (experts, n, -(-groups * bits // 8)), dtype=np.uint8),
            rng.choice(experts, top_k, replace=False).astype(np.int32)]


def measure(bits: int, target, shape: dict = SHAPE, repeat: int = 20) -> tuple[float, float]:
    """(seconds per call, GB/s of routed weight bytes) on ``tvm.cuda(0)``.

    The same ``top_k`` experts are read every call (a few MB): on GPUs whose L2 holds them this is
    an L2-hot upper bound, not DRAM bandwidth.
    """
    import tvm
    dev = tvm.runtime.cuda(0)
    vm = tvm.runtime.vm.VirtualMachine(build(bits, target, shape), dev)
    args = [tvm.runtime.tensor(a, dev) for a in inputs(bits, **shape)]
    secs = min(vm.time_evaluator("main", dev, number=50, repeat=repeat)(*args).results)
    return secs, routed_bytes(bits, **shape) / secs / 1e9
