"""Cross-compiled bundles: `moec compile --target raspberry-pi-5` writes an aarch64 library."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.runtime.remote import elf_machine

pytestmark = pytest.mark.tvm

needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                 reason="needs g++-aarch64-linux-gnu (installed by .ci/run)")


@needs_cross
def test_raspberry_pi_5_bundle_is_aarch64(tmp_path):
    from tests.conftest import compile_tiny_bundle
    out, manifest = compile_tiny_bundle(tmp_path, "--target", "raspberry-pi-5", "--plan", "uniform:4", seed=1)
    assert elf_machine(out / "lib.so") == "aarch64"  # ELF e_machine 183
    assert manifest["target"]["name"] == "raspberry-pi-5" and "cortex-a76" in manifest["tvm_target"]
    assert manifest["kernels"] == "scheduled"  # the ARM family's GEMV schedules, not reference TE


def test_missing_cross_compiler_is_one_line(tmp_path, monkeypatch):
    from tests.conftest import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "bundle"
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "ckpt"), "--target", "raspberry-pi-5",
                                   "--out", str(out)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: target 'raspberry-pi-5' needs the cross compiler 'aarch64-linux-gnu-g++', which is not on "
        "PATH; install it with: apt-get install g++-aarch64-linux-gnu"]
    assert not out.exists()
