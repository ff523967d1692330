"""Routed-expert fused dequantize-GEMVs of moec's CUDA backend: GPU GB/s per bit width, fixed and nested; and
the prefill grouped GEMM (``schedules/cuda_gemm.py``) at each fixed width: GFLOP/s.

A kernel is a Relax ``main`` holding one GEMV as a decode step emits it: the fixed-width stack
(``gpu_linear.expert_dequant_gemv``: ``x, packed, scale, zero, ids``) or the nested 8-bit stack served at
a run-time width (``gpu_linear.expert_nested_gemv``: ``x, segments…, scale, zero, prec, ids``).
:func:`prepare` builds them where TVM's compiler and nvcc are (the library plus its nvcc fatbin);
:func:`measure` times one on ``tvm.cuda(0)`` with only the TVM runtime (the fatbin answers TVM's compile
hook, ``moec.runtime.tvm_runtime``).

Shapes: ``olmoe`` (OLMoE-1B-7B expert projection [1024, 2048], top-8 of 64; its 8 experts fit a large
GPU's L2, so this is an L2-hot figure, as a decode step with repeated experts sees) and ``dram`` (32
experts of [4096, 4096], all routed: 144 MB at 2 bits, 537 MB at 8, several times an H100/H200's L2).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPES = {"olmoe": {"n": 1024, "k": 2048, "experts": 64, "top_k": 8, "group": 64},
          "dram": {"n": 4096, "k": 4096, "experts": 32, "top_k": 32, "group": 64}}
NESTED_STORAGE = 8
_DEVICE_INPUTS: dict = {}  # (shape, bits, fixed?) -> the last stack's device arguments


def _zero_bytes(k: int, group: int, bits: int) -> int:
    from moec.quant.pack import packed_row_bytes
    return packed_row_bytes(k // group, bits)


def expert_gemv_module(bits: int, n: int, k: int, experts: int, top_k: int, group: int, width: int | None = None,
                       expert_kernel: str = "bound", activations: str = "float32"):
    """Relax ``main``: the fixed ``bits`` GEMV, or (``width`` given) the nested ``bits``-bit stack at run-time
    widths (``expert_kernel``: ``gpu_linear.EXPERT_KERNELS``; ``activations``: the hand kernels' bodies, a nested
    stack with int8 in the run layout where :func:`run_layout` says so, as the emitter lays it out)."""
    import tvm
    from tvm import relax

    from moec.core.formats import get_nested_format
    from moec.lower.gpu_linear import emit_fixed_gemv, emit_nested_gemv
    groups = k // group
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, k), "float32"))
    scale = relax.Var("scale", relax.TensorType((experts, n, groups), "float16"))
    zero = relax.Var("zero", relax.TensorType((experts, n, _zero_bytes(k, group, bits)), "uint8"))
    ids = relax.Var("ids", relax.TensorType((top_k,), "int32"))
    if width is None:
        packed = [relax.Var("packed", relax.TensorType((experts, n, k * bits // 8), "uint8"))]
        params = [x, *packed, scale, zero, ids]
    else:
        packed = [relax.Var(f"seg{i}", relax.TensorType((experts, n, k * b // 8), "uint8"))
                  for i, b in enumerate(get_nested_format(bits).segment_bits)]
        prec = relax.Var("prec", relax.TensorType((experts,), "int32"))
        params = [x, *packed, scale, zero, prec, ids]
    with bb.function("main", params):
        with bb.dataflow():
            if width is None:  # as the CUDA emitter makes them (the hand-written kernels where the shape fits)
                y = emit_fixed_gemv(bb, x, *packed, scale, zero, ids, bits, n, k, group, expert_kernel, activations,
                                    run_layout(bits, n, k, group, activations, nested=False))
            else:
                y = emit_nested_gemv(bb, x, packed, scale, zero, prec, ids, bits, n, k, group, expert_kernel,
                                     activations, run_layout(bits, n, k, group, activations))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    assert isinstance(mod, tvm.IRModule)
    return mod


#: Rows per expert of the prefill grouped GEMM cases: a 512-token prompt over OLMoE's 64 experts, top-8.
GEMM_ROWS = 64


def grouped_gemm_module(bits: int, n: int, k: int, experts: int, group: int, rows: int = GEMM_ROWS, **_):
    """Relax ``main``: the CUDA prefill's grouped GEMM (``schedules/cuda_gemm.py``) over a fixed ``bits`` stack,
    ``rows`` sorted rows per expert (``x, packed, scale, zero, offsets``)."""
    import tvm
    from tvm import relax

    from moec.lower.schedules.cuda_gemm import cuda_grouped_gemm
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((experts * rows, k), "float32"))
    packed = relax.Var("packed", relax.TensorType((experts, n, k * bits // 8), "uint8"))
    scale = relax.Var("scale", relax.TensorType((experts, n, k // group), "float16"))
    zero = relax.Var("zero", relax.TensorType((experts, n, _zero_bytes(k, group, bits)), "uint8"))
    offsets = relax.Var("offsets", relax.TensorType((experts + 1,), "int32"))
    with bb.function("main", [x, packed, scale, zero, offsets]):
        with bb.dataflow():
            gv = bb.add_func(cuda_grouped_gemm("fixed", bits, n, k, experts, group).without_attr("global_symbol"),
                             "cuda_grouped_gemm")
            out = bb.emit_output(bb.emit(relax.call_tir(gv, [x, packed, scale, zero, offsets],
                                                        relax.TensorType((experts * rows, n), "float32"))))
        bb.emit_func_output(out)
    mod = bb.get()
    assert isinstance(mod, tvm.IRModule)
    return mod


def gemm_inputs(bits: int, n: int, k: int, experts: int, group: int, rows: int = GEMM_ROWS, **_) -> list[np.ndarray]:
    """Random arguments of :func:`grouped_gemm_module`'s ``main`` (every expert ``rows`` rows)."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((experts * rows, k)).astype(np.float32),
            rng.integers(0, 256, (experts, n, k * bits // 8), dtype=np.uint8),
            (rng.random((experts, n, k // group), dtype=np.float32) * 0.01).astype(np.float16),
            rng.integers(0, 256, (experts, n, _zero_bytes(k, group, bits)), dtype=np.uint8),
            (np.arange(experts + 1) * rows).astype(np.int32)]


def gemm_cases(bits_list: list[int], shapes: list[str]) -> list[dict]:
    """The prefill grouped GEMM at each fixed width, on the OLMoE shape (if asked for): ``GEMM_ROWS`` rows an
    expert, every expert."""
    return [{"kind": "gemm", "shape": "olmoe", "bits": bits, "width": None, "activations": "float32"}
            for bits in bits_list if "olmoe" in shapes]


def gemm_flops(case: dict) -> int:
    sh = SHAPES[case["shape"]]
    return 2 * sh["experts"] * GEMM_ROWS * sh["n"] * sh["k"]


def run_layout(bits: int, n: int, k: int, group: int, activations: str, nested: bool = True) -> bool:
    """Whether the GPU emitter lays a routed stack of this shape out in runs (``kernels/cuda_layout.py``)."""
    from moec.lower.schedules.cuda_gemv_int8 import run_layout_fits
    return activations == "int8" and run_layout_fits(bits, n, k, group, nested=nested)


def routed_bytes(bits: int, n: int, k: int, top_k: int, group: int, **_) -> int:
    """Bytes one fixed-width call reads from the weights: ``top_k`` experts' packed codes, fp16 scales and zeros."""
    from moec.quant.pack import packed_nbytes
    return top_k * packed_nbytes(n, k, bits, group)["total"]


def nested_routed_bytes(width: int, n: int, k: int, top_k: int, group: int, storage: int = NESTED_STORAGE,
                        **_) -> int:
    """Bytes one nested call at ``width`` reads: the planes that width needs, fp16 scales, storage-width zeros."""
    return top_k * (n * k * width // 8 + n * (k // group) * 2 + n * _zero_bytes(k, group, storage))


def build(bits: int, target, shape: dict, width: int | None = None, expert_kernel: str = "bound",
          activations: str = "float32"):
    """The compiled executable for ``target`` (a CUDA ``tvm.target.Target``)."""
    return _compile(expert_gemv_module(bits, **shape, width=width, expert_kernel=expert_kernel,
                                       activations=activations), target)


def _compile(mod, target):
    """``mod`` through the CUDA backend's phases for ``target``."""
    import tvm

    from moec.lower.pipeline import CUDA_PHASES, make_pipeline
    with target:
        return tvm.compile(mod, target=target, relax_pipeline=make_pipeline(CUDA_PHASES))


def build_gemm(bits: int, target, shape: dict):
    """The compiled :func:`grouped_gemm_module` for ``target``."""
    return _compile(grouped_gemm_module(bits, **shape), target)


def inputs(bits: int, n: int, k: int, experts: int, top_k: int, group: int, width: int | None = None,
           activations: str = "float32") -> list[np.ndarray]:
    """Random arguments of ``main`` (the nested stack: every expert at ``width``, its segments in the layout the
    emitter gives them for ``activations``)."""
    from moec.core.formats import get_nested_format
    rng = np.random.default_rng(0)
    groups = k // group
    seg_bits = [bits] if width is None else list(get_nested_format(bits).segment_bits)
    out = [rng.standard_normal((1, k)).astype(np.float32)]
    segs = [rng.integers(0, 256, (experts, n, k * b // 8), dtype=np.uint8) for b in seg_bits]
    if run_layout(bits, n, k, group, activations, nested=width is not None):
        from moec.lower.kernels.cuda_layout import to_run_layout
        segs = [to_run_layout(s, b, k) for s, b in zip(segs, seg_bits)]
    out += segs
    out += [(rng.random((experts, n, groups), dtype=np.float32) * 0.01).astype(np.float16),
            rng.integers(0, 256, (experts, n, _zero_bytes(k, group, bits)), dtype=np.uint8)]
    if width is not None:
        out.append(np.full(experts, width, np.int32))
    out.append(rng.choice(experts, top_k, replace=False).astype(np.int32))
    return out


def kernel_cases(bits_list: list[int], shapes: list[str], activations: tuple[str, ...] = ("float32",)) -> list[dict]:
    """Fixed GEMVs at each width and the nested 8-bit stack served at each width, per shape and activations."""
    cases = []
    for shape in shapes:
        for acts in activations:
            for bits in bits_list:
                cases.append({"shape": shape, "bits": bits, "width": None, "activations": acts})
                cases.append({"shape": shape, "bits": NESTED_STORAGE, "width": bits, "activations": acts})
    return cases


def case_label(case: dict) -> str:
    sh = SHAPES[case["shape"]]
    if case.get("kind") == "gemm":
        return f"prefill GEMM {case['bits']}-bit {case['shape']} {sh['experts']}x{GEMM_ROWS} rows x{sh['n']}x{sh['k']}"
    kind = f"{case['bits']}-bit" if case["width"] is None else f"nested8@{case['width']}"
    acts = " int8" if case.get("activations", "float32") == "int8" else ""
    return f"GEMV {kind}{acts} {case['shape']} {sh['top_k']}x{sh['n']}x{sh['k']}"


def case_bytes(case: dict) -> int:
    """Weight bytes a call reads (a GEMM: every expert's stack once, its re-reads per tile of rows not counted)."""
    sh = SHAPES[case["shape"]]
    if case.get("kind") == "gemm":
        return routed_bytes(case["bits"], **{**sh, "top_k": sh["experts"]})
    if case["width"] is None:
        return routed_bytes(case["bits"], **sh)
    return nested_routed_bytes(case["width"], **sh, storage=case["bits"])


def export(executable, target, folder: Path, name: str) -> str:
    """Write ``<name>.so`` and its CUDA source and nvcc fatbin (what :func:`measure_prepared` loads); the arch."""
    from moec.lower.cuda_kernels import compile_cuda
    executable.export_library(str(folder / f"{name}.so"))
    kernels = compile_cuda(executable.mod, target)
    (folder / f"{name}.cu").write_text(kernels.source)
    (folder / f"{name}.fatbin").write_bytes(kernels.fatbin)
    return kernels.arch


def prepare(cases: list[dict], target, folder: Path) -> list[dict]:
    """Build every case for ``target`` into ``folder``: ``<name>.so``, its CUDA source and nvcc fatbin."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for case in cases:
        acts = case.get("activations", "float32")
        name = f"{case['shape']}-{case['bits']}" + ("" if case["width"] is None else f"-w{case['width']}") + (
            "-int8" if acts == "int8" else "") + ("-gemm" if case.get("kind") == "gemm" else "")
        if case.get("kind") == "gemm":
            executable = build_gemm(case["bits"], target, SHAPES[case["shape"]])
        else:
            executable = build(case["bits"], target, SHAPES[case["shape"]], case["width"], activations=acts)
        arch = export(executable, target, folder, name)
        out.append({**case, "name": name, "arch": arch})
    (folder / "kernels.json").write_text(json.dumps(out, indent=1))
    return out


def measure_prepared(entry: dict, folder: Path, repeat: int = 20) -> tuple[float, float]:
    """(seconds per call, GB/s of routed weight bytes) of a :func:`prepare` d kernel on ``tvm.cuda(0)``."""
    import tvm

    from moec.runtime.tvm_runtime import use_bundle_kernels
    dev = tvm.runtime.cuda(0)
    name = entry["name"]
    use_bundle_kernels((folder / f"{name}.cu").read_bytes(), (folder / f"{name}.fatbin").read_bytes(),
                       entry["arch"], dev)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(folder / f"{name}.so")), dev)
    acts = entry.get("activations", "float32")
    gemm = entry.get("kind") == "gemm"
    key = (entry["shape"], entry["bits"], entry["width"] is None, acts, gemm)
    if key not in _DEVICE_INPUTS:  # one upload per stack; the nested widths differ only in ``prec``
        _DEVICE_INPUTS.clear()
        arrays = gemm_inputs(entry["bits"], **SHAPES[entry["shape"]]) if gemm else inputs(
            entry["bits"], **SHAPES[entry["shape"]], width=entry["width"], activations=acts)
        _DEVICE_INPUTS[key] = [tvm.runtime.tensor(a, dev) for a in arrays]
    args = list(_DEVICE_INPUTS[key])
    if entry["width"] is not None:
        args[-2] = tvm.runtime.tensor(np.full(SHAPES[entry["shape"]]["experts"], entry["width"], np.int32), dev)
    number = 5 if gemm else 50  # a GEMM call is milliseconds, a GEMV's microseconds
    secs = min(vm.time_evaluator("main", dev, number=number, repeat=repeat)(*args).results)
    return secs, case_bytes(entry) / secs / 1e9
