"""A device with the TVM runtime alone (no ``libtvm_compiler``): ``moec run`` works, compiler commands refuse in
one line, and CUDA bundles answer TVM's compile hook with their own verified fatbin (``moec.runtime.tvm_runtime``)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from moec.core.errors import MoecError
from moec.runtime import tvm_runtime
from moec.runtime.plan_switch import nested_array_bytes
from tests.cli_helpers import run
from tests.conftest import REPO

pytestmark = pytest.mark.tvm


def _runtime_only(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("runtime-only")
    make_tiny_checkpoint(root / "ckpt", max_position=48)
    code, out = run("compile", root / "ckpt", "--plan", "uniform:4", "--out", root / "b")
    assert code == 0, out
    return root / "b"


def test_bundle_runs_with_the_tvm_runtime_alone(bundle):
    """Same text as with the full TVM, in a process where TVM's compiler library was never loaded."""
    code, want = run("run", bundle, "--prompt", "The quick brown", "--max-new-tokens", 6)
    assert code == 0, want
    probe = ("import sys, tvm; from moec.cli.main import cli; rc = cli.main(sys.argv[1:], prog_name='moec', "
             "standalone_mode=False); print('LIBS', sorted(tvm.base._LOADED_LIBS))")
    res = _runtime_only("-c", probe, "run", str(bundle), "--prompt", "The quick brown", "--max-new-tokens", "6")
    assert res.returncode == 0, res.stderr
    text, libs = res.stdout.split("LIBS")
    assert text.splitlines()[0] == want.splitlines()[0]
    assert "tvm_compiler" not in libs and "tvm_runtime_extra" in libs  # the router's argsort lives there


def test_compiler_commands_refuse_in_one_line_without_the_compiler(tmp_path):
    res = _runtime_only("-m", "moec.cli.main", "compile", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and not res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs Apache TVM's compiler library" in lines[0] and "moec run" in lines[0]
    assert not (tmp_path / "o").exists()
    listing = _runtime_only("-m", "moec.cli.main", "--help")
    assert listing.returncode == 0
    rows = {ln.split()[0]: ln for ln in listing.stdout.splitlines() if ln.startswith("  ") and ln.split()}
    assert "needs the TVM compiler" in rows["compile"]
    assert not any("needs the TVM compiler" in rows[c] for c in ("run", "inspect", "targets", "keygen", "farm"))


def test_bundle_verifies_and_inspects_with_the_tvm_runtime_alone(bundle):
    res = _runtime_only("-m", "moec.cli.main", "inspect", "--verify", str(bundle))
    assert res.returncode == 0 and res.stdout.startswith(f"bundle '{bundle}' verified:"), res.stderr
    res = _runtime_only("-m", "moec.cli.main", "inspect", str(bundle))
    assert res.returncode == 0 and "layer" in res.stdout, res.stderr


class _Gpu(SimpleNamespace):
    """Stands in for ``tvm.cuda(0)``: the hook only asks for the compute capability."""


@pytest.fixture
def hook_state(monkeypatch):
    """Fresh hook tables for a test (the process-wide hook stays registered: it forwards unknown sources)."""
    monkeypatch.setattr(tvm_runtime, "_KERNELS", [])
    return tvm_runtime


def test_compile_hook_answers_with_the_bundle_fatbin(hook_state):
    import tvm_ffi
    source = b"// module A\nextern \"C\" __global__ void a() {}\n// module B\nextern \"C\" __global__ void b() {}\n"
    hook_state.use_bundle_kernels(source, b"FATBIN-87", "sm_87", _Gpu(compute_version="8.7"))
    hook = tvm_ffi.get_global_func(tvm_runtime.HOOK)
    assert bytes(hook(source.decode())) == b"FATBIN-87"
    # lib.so may hold one device module per source part: each part is served the whole fatbin
    assert bytes(hook("// module B\nextern \"C\" __global__ void b() {}\n")) == b"FATBIN-87"


def test_unknown_source_without_a_compiler_is_one_line(hook_state, monkeypatch):
    monkeypatch.setattr(tvm_runtime, "_FALLBACK", [None])
    with pytest.raises(MoecError, match="not a loaded bundle's and no CUDA compiler"):
        tvm_runtime._compile_hook("__global__ void other() {}")


def test_other_gpu_arch_without_a_compiler_is_one_line(hook_state, monkeypatch):
    monkeypatch.setattr(tvm_runtime, "_FALLBACK", [])
    monkeypatch.setattr(tvm_runtime, "_current_hook", lambda: None)
    with pytest.raises(MoecError, match=r"built for sm_87 but this GPU is sm_90.*--target cuda:sm_90"):
        tvm_runtime.use_bundle_kernels(b"src", b"fat", "sm_87", _Gpu(compute_version="9.0"))
    assert tvm_runtime._KERNELS == []


def test_nested_array_bytes_read_cpu_and_cuda_names_alike():
    """CPU bundles name a nested stack's arrays kseg0…/kscale/kzero, CUDA bundles seg0…/scale/zero."""
    shapes = [((8, 64, 32), "uint8"), ((8, 64, 16), "uint8"), ((8, 64, 4), "float16"), ((8, 64, 4), "uint8")]
    cpu = [f"layers.1.experts.nested.w1.{a}" for a in ("kseg0", "kseg1", "kscale", "kzero")]
    cuda = [f"layers.1.experts.nested.w1.{a}" for a in ("seg0", "seg1", "scale", "zero")]
    want = {"layers.1.experts.nested.w1": {"seg0": 64 * 32, "seg1": 64 * 16, "scale": 64 * 4 * 2, "zero": 64 * 4}}
    assert nested_array_bytes(cpu, shapes) == nested_array_bytes(cuda, shapes) == want
    assert nested_array_bytes(["layers.1.experts.prec"], [((8,), "int32")]) == {}
