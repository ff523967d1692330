"""Emulated-device set-up without the network: missing tools, unusable folders, a finished folder is reused."""

from __future__ import annotations

import json
import os

import pytest

from moec.core.errors import MoecError
from moec.hardware import emulated


def test_missing_tools_name_the_apt_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(emulated, "missing_host_tools", lambda: ["qemu-aarch64-static", "debootstrap"])
    with pytest.raises(MoecError, match="missing qemu-aarch64-static, debootstrap; install them with: "
                                        "sudo apt-get install -y --no-install-recommends debootstrap qemu-user-static"):
        emulated.setup_device(tmp_path / "dev", install_tools=False)
    assert not (tmp_path / "dev" / "ready.json").exists()


def test_unusable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoecError, match="cannot create the device folder"):
        emulated.setup_device(tmp_path / "file" / "dev")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(MoecError, match="not writable"):
            emulated.setup_device(ro)


def test_ready_folder_is_reused_without_work(tmp_path, monkeypatch):
    dev = emulated.EmulatedDevice(tmp_path)
    (dev.rootfs / "usr/bin").mkdir(parents=True)
    (dev.rootfs / "usr/bin" / emulated.DEVICE_PYTHON).write_text("")
    dev.python.parent.mkdir(parents=True)
    dev.python.write_text("#!/bin/sh\n")
    dev.stamp.write_text(json.dumps({"layout": emulated.LAYOUT_VERSION, "tvm": emulated.TVM_WHEEL}))

    def no_work(*a, **k):
        raise AssertionError("a ready device was set up again")

    monkeypatch.setattr(emulated, "ensure_host_tools", no_work)
    assert emulated.setup_device(tmp_path).root == tmp_path.resolve()
    dev.stamp.write_text(json.dumps({"layout": emulated.LAYOUT_VERSION - 1, "tvm": emulated.TVM_WHEEL}))
    with pytest.raises(AssertionError, match="set up again"):  # an older layout is redone
        emulated.setup_device(tmp_path)
