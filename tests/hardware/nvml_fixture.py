"""A fake ``pynvml`` module: a GPU drawing a fixed power, with or without the total-energy counter."""

from __future__ import annotations

import sys
import time
import types

import pytest


def fake_nvml(watts: float = 250.0, energy_counter: bool = True, gpus: int = 1, driver: bool = True):
    """A module with pynvml's names; energy and power follow ``watts`` on the monotonic clock."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's name
        pass

    start = time.monotonic()
    mod.NVMLError, mod.NVMLError_NotSupported = NVMLError, NVMLError_NotSupported
    mod.calls = []

    def init():
        mod.calls.append("init")
        if not driver:
            raise NVMLError("Driver Not Loaded")

    def handle(i):
        if i >= gpus:
            raise NVMLError("Invalid Argument")
        return ("gpu", i)

    def energy(h):
        if not energy_counter:
            raise NVMLError_NotSupported("Not Supported")
        return int(5_000_000 + (time.monotonic() - start) * watts * 1e3)  # mJ since the driver loaded

    mod.nvmlInit, mod.nvmlShutdown = init, lambda: mod.calls.append("shutdown")
    mod.nvmlDeviceGetHandleByIndex = handle
    mod.nvmlDeviceGetName = lambda h: b"NVIDIA Fake GPU"
    mod.nvmlDeviceGetTotalEnergyConsumption = energy
    mod.nvmlDeviceGetPowerUsage = lambda h: int(watts * 1e3)  # mW
    return mod


@pytest.fixture
def nvml(monkeypatch):
    """Install a fake pynvml (250 W, energy counter) as the importable ``pynvml``; returns a setter for others."""
    def install(**kwargs):
        mod = fake_nvml(**kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", mod)
        return mod
    install()
    return install
