"""NVML energy meter of an NVIDIA GPU (pynvml / nvidia-ml-py, optional): total-energy counter or sampled power."""

from __future__ import annotations

import importlib
import threading

_INIT_LOCK = threading.Lock()


def nvml_module():
    """The ``pynvml`` module (from the ``nvidia-ml-py`` package), or None when it is not installed."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def parse_index(path: str) -> int:
    """GPU index of a preset sensor path: ``nvml:1`` -> 1, ``nvml`` -> 0."""
    tail = path.split(":", 1)[1] if ":" in path else "0"
    if not tail.isdigit():
        raise ValueError(f"bad NVML sensor path {path!r}; expected nvml:INDEX, e.g. nvml:0")
    return int(tail)


class NvmlMeter:
    """Energy of one GPU through NVML.

    Volta and later report a cumulative board-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
    mJ since the driver loaded): the meter is then cumulative and reads joules. Older boards (or a
    driver that says "not supported") only report instantaneous board power
    (``nvmlDeviceGetPowerUsage``, mW): the meter then reads watts and :class:`~moec.hardware.energy.Sampler`
    integrates the samples. Raises ``FileNotFoundError`` (the meters' "not here" signal) when pynvml
    is missing, NVML cannot start (no driver) or there is no GPU ``index``.
    """

    def __init__(self, index: int = 0, nvml=None) -> None:
        nvml = nvml if nvml is not None else nvml_module()
        if nvml is None:
            raise FileNotFoundError("pynvml is not installed (pip install nvidia-ml-py)")
        self.nvml, self.index = nvml, index
        try:
            with _INIT_LOCK:
                nvml.nvmlInit()
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpu = nvml.nvmlDeviceGetName(self.handle)
        except nvml.NVMLError as exc:
            raise FileNotFoundError(f"NVML GPU {index} is not available: {exc}") from None
        gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.cumulative, how = True, "energy"
        except nvml.NVMLError:  # NVMLError_NotSupported before Volta: sample power instead
            nvml.nvmlDeviceGetPowerUsage(self.handle)  # raises if neither is supported
            self.cumulative, how = False, "power"
        self.kind = "nvml"
        self.name = f"nvml:{index}:{gpu}:{how}"

    def read(self) -> float:
        """Joules since the driver loaded (cumulative) or watts now (power sampling)."""
        if self.cumulative:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) * 1e-3
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) * 1e-3

    def delta(self, before_j: float, after_j: float) -> float:
        """Energy between two counter reads (a 64-bit mJ counter: it goes back only if the driver reloaded)."""
        return max(after_j - before_j, 0.0)

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass
