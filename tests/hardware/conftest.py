"""Fixtures shared by the hardware tests."""

from __future__ import annotations

import pytest

from tests.hardware.emulated_fixtures import DeviceBoot, skip_reason


@pytest.fixture(scope="session")
def emulated_boot(tmp_path_factory):
    """The session's emulated arm64 device, booting in the background (call ``.result()`` to wait)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    boot = DeviceBoot(tmp_path_factory.mktemp("emu-logs"))
    yield boot
    boot.stop()
