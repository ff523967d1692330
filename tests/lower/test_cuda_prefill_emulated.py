"""The CUDA prefill's row-wise kernels as the CUDA backend schedules them (dlight's GPU rules over the TE forms:
causal attention scores, softmax, values, RMSNorm, SiLU, RoPE, adds), run as CUDA C under the host emulation
(``cuda_host.py``) at concrete row counts and positions, against the same functions unscheduled on the CPU.
A GPU has never run these schedules at symbolic prompt lengths; here each one's threads, shared memory and
cross-thread reductions run as written for it."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from cuda_host import HostKernel

pytestmark = [pytest.mark.tvm, pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")]

#: rows in the chunk, cached positions before it: a partial 32-row tile, and a chunk after a cache
VALUES = [{"T": 5, "P": 0, "C": 8}, {"T": 37, "P": 6, "C": 48}]  # C: the caches' capacity


#: gpt-oss-like: attention sinks and a sliding window keep the TE attention forms (scores, softmax, values)
SINKS = {"hidden_size": 256, "expert_intermediate": 256, "attention_sinks": True, "sliding_window": 3,
         "architecture": "GptOssForCausalLM"}


@pytest.fixture(scope="module", params=["reference", "sinks", "int8"])
def prefill_kernels(request):
    """(model, {name: (unscheduled, scheduled) PrimFunc}) of a model's CUDA prefill functions whose buffers are all
    float32 and that launch one kernel: the reference model, a gpt-oss-like one whose attention keeps the TE forms,
    and the reference model with int8 activations (its GEMMs' rows rounded as the int8 decode GEMVs round them)."""
    from moec.core.plan import resolve_plan
    from moec.core.targets import load_target
    from moec.lower.decode_graph import DecodeBuilder
    from moec.lower.gpu_linear import GpuLinearEmitter
    from moec.lower.kernel_linear import apply_kernel_layout
    from moec.lower.params import build_params
    from moec.lower.pipeline import CUDA_PHASES
    from moec.lower.prefill_graph import PrefillBuilder
    from moec.models.checkpoint import load_checkpoint
    from moec.quant.weights import ModelWeights
    from tests.conftest import REPO
    from tests.export.export_fixtures import random_model
    if request.param in ("reference", "int8"):
        model = load_checkpoint(REPO / "reference" / "checkpoint")
    else:
        model = random_model(4, **SINKS)
    plan = resolve_plan("uniform:4", model.cfg, 64)
    weights = ModelWeights.from_model(model, plan)
    params = build_params(model.cfg, plan, weights.packed, weights.floats)
    bb = relax.BlockBuilder()
    emitter = GpuLinearEmitter(activations="int8" if request.param == "int8" else "float32")
    apply_kernel_layout(params, emitter)
    DecodeBuilder(model.cfg, params, emitter).build(bb)  # first, as the bundler does: it records the int8 weights
    builder = PrefillBuilder(model.cfg, params, emitter)
    assert builder.supported()
    mod = builder.build(bb)
    phases = dict(CUDA_PHASES)
    target = load_target("cuda:sm_90").tvm()
    with target:
        for name in ("dispatch", "legalize"):
            mod = tvm.transform.Sequential(phases[name](target))(mod)
        # dlight schedules the module it is given in place: schedule a copy, keep the unscheduled functions
        scheduled = tvm.transform.Sequential(phases["schedule"](target))(tvm.IRModule(dict(mod.functions)))
    out = {}
    for gv, func in scheduled.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or "T.launch_thread(" in func.script():
            continue
        bufs = [p for p in func.params if hasattr(p, "dtype") and len(getattr(p, "shape", ())) > 0]
        if any(str(p.dtype) != "float32" for p in bufs) or gv.name_hint.startswith("cuda_"):
            continue  # int inputs (routing, sorting) need meaningful data; the grouped GEMMs have their own tests
        out[gv.name_hint] = (mod[gv.name_hint], func)
    return request.param, out


_OPS = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
        "FloorDiv": lambda a, b: a // b, "FloorMod": lambda a, b: a % b, "Max": max, "Min": min}


def _eval(e, values: dict[str, int]) -> int:
    """A shape expression's value with its variables (by name) at ``values``."""
    if isinstance(e, tvm.tirx.IntImm):
        return int(e.value)
    if isinstance(e, tvm.tirx.Var):
        return values[e.name]
    if isinstance(e, tvm.tirx.Cast):
        return _eval(e.value, values)
    return _OPS[type(e).__name__](_eval(e.a, values), _eval(e.b, values))


def _shape(buf, values) -> tuple[int, ...]:
    return tuple(_eval(d, values) for d in buf.shape)


def _vars(buf) -> set[str]:
    return {v.name for d in buf.shape for v in tvm.tirx.analysis.undefined_vars(d)} if _is_buffer(buf) else set()


def _is_buffer(p) -> bool:
    return len(getattr(p, "shape", ())) > 0


def test_the_prefill_has_the_row_kernels(prefill_kernels):
    names = set(prefill_kernels[1])
    assert any(n.startswith("softmax") for n in names) and any("rms_norm" in n for n in names), sorted(names)


@pytest.mark.parametrize("values", VALUES, ids=lambda v: f"T{v['T']}-P{v['P']}")
def test_scheduled_row_kernels_run_as_cuda_c(prefill_kernels, values):
    """Each kernel that reads the chunk's rows (``T`` in a shape) at the given row count and position: its CUDA C
    in both thread orders equals the unscheduled function on the CPU (the last buffer is the output)."""
    rng = np.random.default_rng(0)
    checked = []
    model, kernels = prefill_kernels
    if model != "reference" and values is not VALUES[-1]:
        pytest.skip("the other models at the longer case only (CI time: the emulation runs every thread)")
    for name, (plain, sched) in sorted(kernels.items()):
        if not any(_is_buffer(p) and "T" in _vars(p) for p in sched.params):
            continue  # decode-step kernels: the GEMV tests cover their kind
        scalars = {p.name: values[p.name] for p in sched.params if not _is_buffer(p)}
        arrays = {p.name: rng.standard_normal(_shape(p, values)).astype(np.float32)
                  for p in sched.params if _is_buffer(p)}
        out = [p.name for p in sched.params if _is_buffer(p)][-1]
        arrays[out] = np.zeros_like(arrays[out])
        lib = tvm.compile(tvm.IRModule({"main": plain.with_attr("global_symbol", "main")}), target="llvm")
        args = [tvm.runtime.tensor(arrays[p.name]) if _is_buffer(p) else scalars[p.name] for p in plain.params]
        lib["main"](*args)
        want = args[[p.name for p in plain.params].index(out)].numpy()
        # the script spells the variable T as T_1 (T is its module): launch extents read the script
        kern = HostKernel.of(sched.with_attr("global_symbol", "main"), "sm_90",
                             {("T_1" if k == "T" else k): v for k, v in values.items()}, cse=False)
        c_names = {re.sub(r"\W", "_", n): a for n, a in arrays.items()}  # "layers.0.x" is "layers_0_x" in C
        got = [kern(reverse=r, **c_names, **values)[re.sub(r"\W", "_", out)] for r in (False, True)]
        np.testing.assert_array_equal(got[0], got[1])
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))
        checked.append(name)
    # at the time of writing 18 (reference), 23 (sinks) and 20 (int8): softmax, norms, SiLU, RoPE, the cache rows,
    # adds and copies; the attention's TE forms where sinks keep them (the reference model's is cuda_causal_attention);
    # the int8 rounding of the GEMMs' rows
    names = {n.rstrip("0123456789") for n in checked}
    assert {"softmax", "rms_norm"} <= names, checked
    if model == "int8":
        assert "int8_rows" in names, checked
    if model == "sinks":
        assert {"causal_row_scores", "causal_row_values"} <= names, checked
    assert len(checked) >= 15, checked
