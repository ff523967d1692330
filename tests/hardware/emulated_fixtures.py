"""One emulated arm64 device (qemu-user TVM RPC server behind a stock tracker) for the whole test session.

It boots in a background thread the first time a test asks for it, so the caller can build its bundles
while qemu starts; every later test file reuses the same device instead of booting its own.
"""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor

KEY = "arm64-emu"


def skip_reason() -> str | None:
    from moec.hardware.emulated import missing_host_tools
    if sys.platform != "linux":
        return "the emulated arm64 device needs Linux (qemu-user)"
    missing = missing_host_tools()
    if missing and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        return f"missing {', '.join(missing)} and not root with apt-get to install them"
    return None


class DeviceBoot:
    """The device boot started in the background; ``result()`` waits for the running device."""

    def __init__(self, log_dir):
        from moec.hardware.emulated import start_device
        self._pool = ThreadPoolExecutor(1)
        self._started: Future = self._pool.submit(start_device, key=KEY, timeout=300, log_dir=log_dir)

    def result(self):
        return self._started.result()

    def stop(self) -> None:
        try:
            run = self._started.result()
        except BaseException:
            return  # it never started: nothing to stop (the test that waited on it reported why)
        finally:
            self._pool.shutdown()
        run.stop()
        assert not run.server.alive() and not run.tracker.alive()
