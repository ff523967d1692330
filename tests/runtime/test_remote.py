"""Remote runs: tracker address parsing, unreachable trackers fail fast, ELF machine detection."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.runtime.remote import TrackerAddress, elf_machine, request_device
from moec.runtime.session import cuda_available
from tests.cli_helpers import assert_one_line_error, run

pytestmark = pytest.mark.tvm


def _closed_port() -> int:
    from moec.hardware.loopback import free_port
    return free_port()  # bound then released: nothing listens there


@pytest.mark.parametrize("text", ["127.0.0.1", "host:", ":9190", "h:99999", "h:port"])
def test_bad_tracker_address(text):
    with pytest.raises(MoecError, match="bad tracker address"):
        TrackerAddress.parse(text)


def test_unreachable_tracker_fails_fast(tmp_path):
    port = _closed_port()
    t0 = time.time()
    with pytest.raises(MoecError, match=f"cannot reach the RPC tracker at 127.0.0.1:{port}"):
        request_device(TrackerAddress("127.0.0.1", port), "arm64-emu", timeout=30)
    assert time.time() - t0 < 5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from moec import api
    from tests.conftest import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("remote")
    make_tiny_checkpoint(root / "ckpt", hidden_size=32, num_layers=1, expert_intermediate=32)
    return api.compile_bundle(api.CompileConfig(root / "ckpt", root / "b", plan="uniform:4", group_size=32))


def test_cli_unreachable_tracker_is_one_line(bundle):
    port = _closed_port()
    t0 = time.time()
    res = CliRunner().invoke(cli, ["run", str(bundle), "--rpc", f"127.0.0.1:{port}", "--prompt", "hi"])
    assert res.exit_code == 2 and time.time() - t0 < 10
    assert res.output.strip() == f"error: cannot reach the RPC tracker at 127.0.0.1:{port}: Connection refused"
    res = CliRunner().invoke(cli, ["run", str(bundle), "--key", "arm64-emu", "--prompt", "hi"])
    assert res.exit_code == 2 and "--key needs --rpc" in res.output


def test_not_a_tracker(tmp_path):
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def answer():
        conn, _ = srv.accept()
        conn.recv(4)
        conn.sendall(b"HTTP")
        conn.close()

    th = threading.Thread(target=answer, daemon=True)
    th.start()
    with pytest.raises(MoecError, match="is not an RPC tracker"):
        request_device(TrackerAddress("127.0.0.1", srv.getsockname()[1]), "k", timeout=5)
    th.join(5)
    srv.close()


def test_elf_machine(tmp_path):
    import sys
    assert elf_machine(sys.executable) in ("x86_64", "aarch64")
    (tmp_path / "x").write_bytes(b"not an elf file at all")
    assert elf_machine(tmp_path / "x") is None
    assert elf_machine(tmp_path / "missing") is None


def test_emu_tool_unreachable_tracker_is_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO
    port = _closed_port()
    res = subprocess.run([sys.executable, str(REPO / "tools" / "arm64_emu.py"), "start", "--dir", str(tmp_path / "d"),
                          "--tracker", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: cannot reach the RPC tracker at 127.0.0.1:{port}: Connection refused"
    assert not (tmp_path / "d").exists()  # nothing set up for a tracker that is not there


def _as_device_bundle(bundle, tmp_path, device: str, legacy: bool = False):
    """A copy of ``bundle`` whose manifest says it runs on ``device`` (``legacy``: no backend entry)."""
    import json
    import shutil
    copy = tmp_path / f"b-{device}"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["backend"]["runtime_device"] == "cpu"
    manifest["target"].update(name="jetson-agx-orin", family=device)
    manifest["backend"] = {"name": device, "runtime_device": device}
    if legacy:
        del manifest["backend"]  # a bundle from before backends: its target family decides
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("legacy", [False, True])
def test_unknown_device_bundle_is_refused(bundle, tmp_path, legacy):
    from moec.runtime.session import BundleSession
    with pytest.raises(MoecError, match="runs on vulkan.*runs cpu and cuda bundles only"):
        BundleSession(_as_device_bundle(bundle, tmp_path, "vulkan", legacy))


@pytest.mark.skipif(cuda_available(), reason="this machine has a CUDA GPU")
def test_cuda_bundle_without_a_gpu_is_one_line(bundle, tmp_path, monkeypatch):
    from moec.runtime.session import BundleSession
    copy = _as_device_bundle(bundle, tmp_path, "cuda")
    loads = []
    monkeypatch.setattr("tvm.runtime.load_module", lambda *a, **k: loads.append(a))
    with pytest.raises(MoecError, match=r"is a CUDA bundle but this machine has no usable CUDA GPU") as err:
        BundleSession(copy)
    assert "\n" not in str(err.value) and loads == []  # refused before lib.so is loaded
    code, out = run("run", copy, "--prompt", "The quick")
    assert_one_line_error(code, out, "no usable CUDA GPU")


def test_cuda_bundle_verifies_before_the_gpu_check(bundle, tmp_path, monkeypatch):
    from moec.runtime.session import BundleSession
    copy = _as_device_bundle(bundle, tmp_path, "cuda")
    with open(copy / "lib.so", "ab") as f:
        f.write(b"x")
    checked = []
    monkeypatch.setattr("moec.runtime.session.require_local_cuda", lambda root: checked.append(root))
    with pytest.raises(MoecError, match="lib.so"):
        BundleSession(copy)
    assert checked == []  # a tampered bundle never reaches the device check


class _NoCudaRemote:
    """An RPC session stand-in whose device has no CUDA GPU (as an rpc_server on a CPU-only host)."""

    def __init__(self):
        self.calls = []

    def upload(self, path, name):
        self.calls.append(("upload", name))

    def load_module(self, name):
        self.calls.append(("load", name))
        return object()

    def cuda(self, index=0):
        import types
        return types.SimpleNamespace(exist=False)


def test_cuda_bundle_on_a_remote_without_a_gpu_is_one_line(bundle, tmp_path):
    from moec.runtime.session import BundleSession
    remote = _NoCudaRemote()
    with pytest.raises(MoecError, match="on the remote device.*has no CUDA GPU"):
        BundleSession(_as_device_bundle(bundle, tmp_path, "cuda"), remote=remote)
    assert remote.calls == [("upload", "moec_lib.so"), ("load", "moec_lib.so")]


@pytest.mark.farm
def test_host_rpc_server_run_and_server_death(bundle, tmp_path, monkeypatch):
    """The remote path on a native RPC server (no emulation): same tokens as local, the weights and KV caches
    held in the device's tensor cache and the caches written there in place (resident entries); the path
    of bundles without them (every tensor passed each call) gives the same tokens; a dead server is one line."""
    import numpy as np

    from moec.artifact.resident_keys import cache_key, param_key
    from moec.hardware.loopback import start_rpc_server, start_tracker
    from moec.runtime.tensor_holder import TensorHolder
    from moec.runtime.session import open_remote_bundle
    from moec.runtime.session import BundleSession
    local = BundleSession(bundle)
    prompt = local.tokenizer.encode("The quick brown").ids
    want, _ = local.generate(prompt, 6)
    assert {"decode_resident", "prefill_resident"} <= set(local.manifest["entry"])
    tracker, addr = start_tracker(log_dir=tmp_path)
    with tracker:
        server = start_rpc_server(addr, "host-test", timeout=120, log_dir=tmp_path)
        with server:
            with monkeypatch.context() as m:  # as for a bundle compiled without resident entries
                m.setattr(TensorHolder, "on", staticmethod(lambda remote: None))
                with open_remote_bundle(bundle, str(addr), "host-test", timeout=30) as sess:
                    assert sess._holder is None and sess.generate(prompt, 6)[0] == want
            with open_remote_bundle(bundle, str(addr), "host-test", timeout=30) as sess:
                assert sess._holder is not None
                got, _ = sess.generate(prompt, 6)
                assert got == want
                held = sess.remote.get_function("vm.builtin.tensor_cache.get")
                for i, kv in enumerate(local.kv_cache()):  # the held caches, written in place by the calls
                    np.testing.assert_allclose(held(cache_key(i)).numpy()[:, :sess.pos], kv, rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(held(param_key(0)).numpy(), local.params[0].numpy())
                np.testing.assert_allclose(sess.step(prompt[0]), local.step(prompt[0]), rtol=1e-5, atol=1e-5)
                # generate reads the greedy token and a finiteness flag the device computes, not the logits
                scale = next(i for i, n in enumerate(sess.manifest["params"]) if n.startswith("lm_head")
                             and n.endswith("scale"))
                sess.params[scale].copyfrom(np.full(sess.params[scale].shape, np.nan, sess.params[scale].dtype))
                with pytest.raises(MoecError, match="non-finite logits"):
                    sess.generate(prompt, 2)
                server.stop()
                with pytest.raises(MoecError, match="remote device failed during a decode call"):
                    sess.step(prompt[0])
        assert not server.alive()


@pytest.mark.farm
def test_tracker_on_a_taken_port_is_a_clear_error(tmp_path):
    from moec.hardware.loopback import start_tracker
    first, addr = start_tracker(log_dir=tmp_path)
    with first:
        with pytest.raises(MoecError, match=f"did not start on 127.0.0.1:{addr.port}: port {addr.port} is in use"):
            start_tracker(port=addr.port, timeout=30, log_dir=tmp_path)
    assert not first.alive()


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (run by tools/gpu_check.sh machines)")
def test_cuda_bundle_tokens_equal_the_cpu_bundle(bundle, tmp_path):
    """On a GPU: a cuda bundle of the same checkpoint and plan decodes (prefill + steps) to the CPU tokens."""
    from moec import api
    from moec.runtime.session import BundleSession
    gpu_bundle = api.compile_bundle(api.CompileConfig(bundle.parent / "ckpt", tmp_path / "gpu", target="cuda",
                                                      plan="uniform:4", group_size=32))
    with BundleSession(bundle) as cpu, BundleSession(gpu_bundle) as gpu:
        assert gpu.dev.dlpack_device_type() == 2 == gpu.params[0].device.dlpack_device_type()  # kDLCUDA: weights on GPU
        prompt = cpu.tokenizer.encode("The quick brown").ids
        assert gpu.generate(prompt, 8)[0] == cpu.generate(prompt, 8)[0]


class _NoCacheRemote:
    """An RPC session whose TVM runtime has no tensor cache (an older runtime)."""

    def get_function(self, name):
        raise AttributeError(f"no function {name}")


def test_tensor_holder_needs_the_remote_tensor_cache_for_cuda_graphs():
    """Locally and for bundles without resident entries no holder; a device without the tensor cache falls
    back to passing the tensors, except for a CUDA bundle that replays CUDA graphs: a one-line error."""
    from moec.runtime.tensor_holder import TensorHolder
    resident = {"entry": {"decode": "decode", "decode_resident": "decode_resident"}, "backend": {"name": "x86"}}
    graphs = {**resident, "backend": {"name": "cuda", "cuda_graphs": True}}
    assert TensorHolder.for_bundle(None, graphs) is None
    assert TensorHolder.for_bundle(_NoCacheRemote(), resident) is None
    for manifest in (graphs, {**graphs, "entry": {"decode": "decode"}}):
        with pytest.raises(MoecError, match="replays CUDA graphs.*no tensor cache"):
            TensorHolder.for_bundle(_NoCacheRemote(), manifest)


class _CacheRemote:
    """An RPC session whose tensor cache already holds a weight (another session's)."""

    def __init__(self, held: dict) -> None:
        self.held = held

    def get_function(self, name):
        return {"vm.builtin.tensor_cache.get": self.held.get}.get(name, lambda *a: None)


def test_one_bundle_session_per_rpc_session():
    """The tensor cache belongs to the server process: a second session on the same RPC session is refused
    (it would replace the first one's weights), one that follows a closed (cleared) one is not."""
    from moec.runtime.tensor_holder import TensorHolder
    manifest = {"entry": {"decode": "decode", "decode_resident": "decode_resident"}}
    with pytest.raises(MoecError, match="already holds another bundle session's tensors"):
        TensorHolder.for_bundle(_CacheRemote({"moec.param.0": object()}), manifest)
    assert TensorHolder.for_bundle(_CacheRemote({}), manifest) is not None


def test_tensor_holder_failure_is_one_line():
    """A device that cannot hold a tensor (out of memory, session gone) is one line, not a TVM traceback."""
    from moec.runtime.tensor_holder import TensorHolder

    def update(key, tensor, override):
        raise RuntimeError("TVMError: Check failed: out of memory\n  device allocation of 64 MB failed")

    with pytest.raises(MoecError, match="cannot hold the bundle's tensors on the remote device: device allocation"):
        TensorHolder(update, None, None).hold([object()], str)
