"""ARM kernels run as aarch64 code: cross-compiled for the Raspberry Pi 5 and executed under qemu-user.

Uses the emulated arm64 device folder (``$MOEC_EMU_DIR``, default ``~/.cache/moec/arm64-emu``: an
aarch64 Python with the aarch64 TVM runtime), set up on first use like ``tools/arm64_emu.py setup``;
skipped only where it cannot exist (not Linux, or tools missing without root + apt-get). NEON float
kernels and the dotprod (``sdot``) int8 kernels are both checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

from moec.core.targets import load_target
from moec.lower.kernels.factory import make_gemv
from moec.lower.kernels.activations import dequantized_activations

from kernel_helpers import assert_close, weight_args
from test_arm_schedules import _stack

pytestmark = [pytest.mark.tvm, pytest.mark.xdist_group("arm64-emu")]  # the device folder: one worker



@pytest.fixture(scope="module")
def emu_python() -> Path:
    """The device's Python (a host wrapper running it under qemu), set up if needed."""
    from moec.hardware.emulated import missing_host_tools, setup_device
    missing = missing_host_tools()
    if sys.platform != "linux" or (missing and (os.geteuid() != 0 or shutil.which("apt-get") is None)):
        pytest.skip(f"the emulated arm64 device cannot be set up here (missing: {', '.join(missing)})")
    return setup_device().python

DEVICE_SCRIPT = """
import sys, numpy as np, tvm
lib = tvm.runtime.load_module(sys.argv[1])
data = np.load(sys.argv[2])
out = {}
for name in sorted({key.split(":")[0] for key in data.files}):
    count = sum(1 for key in data.files if key.split(":")[0] == name)
    args = [tvm.runtime.tensor(data[f"{name}:{i}"], tvm.cpu()) for i in range(count)]
    lib[name](*args)
    out[name] = args[-1].numpy()
np.savez(sys.argv[3], **out)
"""


def test_raspberry_pi_5_kernels_on_emulated_aarch64(tmp_path, emu_python):
    from tvm.support import cc
    target = load_target("raspberry-pi-5").tvm()
    n, k, gs, experts, top_k = 36, 128, 32, 3, 2
    funcs, inputs, refs = {}, {}, {}
    cases = [(b, "float32") for b in (2, 3, 4, 5, 6, 8, 16)] + [(b, "int8") for b in (2, 4, 8)]
    for bits, act in cases:
        name = f"gemv_{bits}_{act}"
        funcs[name] = make_gemv(bits, n, k, gs, experts, top_k, target, x_per_expert=True,
                                activations=act).with_attr("global_symbol", name)
        stack, deq = _stack(bits, n, k, gs, experts, seed=bits)
        x = np.random.default_rng(bits).standard_normal((top_k, k)).astype(np.float32)
        ids = np.array([2, 0], np.int32)
        for i, a in enumerate([x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)]):
            inputs[f"{name}:{i}"] = a
        xr = dequantized_activations(x, gs) if act == "int8" else x
        refs[name] = np.stack([xr[j] @ deq[e].T for j, e in enumerate(ids)])
    lib = tmp_path / "kernels.so"
    tvm.compile(tvm.IRModule(funcs), target=target).export_library(
        str(lib), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    np.savez(tmp_path / "in.npz", **inputs)
    (tmp_path / "device.py").write_text(DEVICE_SCRIPT)
    res = subprocess.run([str(emu_python), str(tmp_path / "device.py"), str(lib),
                          str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    assert set(out.files) == set(refs)
    for name, ref in refs.items():
        assert_close(out[name], ref)
