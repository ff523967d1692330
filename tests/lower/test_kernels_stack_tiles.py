"""Per-task register tiles stay off TVM's workspace allocator (lower/kernels/scopes.py): the parallel
task bodies of the VNNI (fixed, SwiGLU and nested) and ARM dot-product decode GEMVs and of the decode attention make no
``TVMBackendAllocWorkspace`` call (compiled only, for explicit targets: nothing runs)."""

import tvm

from moec.core.targets import load_target
from moec.lower.kernels.decode_attention import decode_attention
from moec.lower.kernels.factory import compile_kernel, make_gemv, make_nested_gemv
from moec.lower.kernels.scopes import MAX_STACK_BYTES, stack_scope

VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "mtriple": "x86_64-linux-gnu"})


def _task_allocations(func, target) -> dict[str, int]:
    """Workspace allocations per LLVM function of ``func`` compiled for ``target``."""
    lib = compile_kernel(func, target)
    src = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("ll")
    counts: dict[str, int] = {}
    name = None
    for line in src.splitlines():
        if line.startswith("define"):
            name = line.split("@", 1)[1].split("(", 1)[0]
            counts[name] = 0
        elif name and "@__TVMBackendAllocWorkspace" in line and "load" in line:
            counts[name] += 1
    return counts


def _lambdas(counts: dict[str, int]) -> dict[str, int]:
    lambdas = {k: v for k, v in counts.items() if "parallel_lambda" in k}
    assert lambdas, "no parallel task body found"
    return lambdas


def test_vnni_gemv_tasks_allocate_nothing():
    for bits in (4, 8):  # two accumulator chains at 4 bits (2 x 512 B), one at 8
        counts = _task_allocations(make_gemv(bits, 256, 512, 64, 4, 2, VNNI, activations="int8"), VNNI)
        assert set(_lambdas(counts).values()) == {0}, counts


def test_vnni_swiglu_gemv_tasks_allocate_nothing():
    """The fused gate/up GEMV keeps a second 512 B result tile for up's rows, on the stack too."""
    for bits in (4, 8):
        func = make_gemv(bits, 256, 512, 64, 4, 2, VNNI, activations="int8", swiglu=True, separate_up=True)
        counts = _task_allocations(func, VNNI)
        assert set(_lambdas(counts).values()) == {0}, counts


def test_vnni_nested_gemv_tasks_allocate_nothing():
    for storage in (4, 8):
        counts = _task_allocations(make_nested_gemv(storage, 256, 512, 64, 4, 2, VNNI, activations="int8"), VNNI)
        assert set(_lambdas(counts).values()) == {0}, counts


def test_arm_dotprod_gemv_tasks_allocate_nothing():
    target = load_target("raspberry-pi-5").tvm()
    counts = _task_allocations(make_gemv(4, 64, 128, 32, 3, 2, target, activations="int8"), target)
    assert set(_lambdas(counts).values()) == {0}, counts


def test_decode_attention_keeps_only_the_score_row_in_the_workspace():
    counts = _task_allocations(decode_attention(4, 2, 64, 64, 0.1), VNNI)
    assert set(_lambdas(counts).values()) == {1}, counts  # the [pos + 1] scores: symbolic size


def test_stack_scope_follows_tvms_limit():
    assert stack_scope(MAX_STACK_BYTES - 4) == "global" and stack_scope(MAX_STACK_BYTES) == "local"
