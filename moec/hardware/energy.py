"""Power meters (INA3221 hwmon, JetPack 4 ina3221x, RAPL, NVML) and their integration.

Layouts read (``root`` replaces ``/`` so fixture directories can stand in for ``/sys``):

- INA3221 via hwmon (JetPack 5/6): ``…/hwmon/hwmonN/{name, inK_label, inK_input (mV), currK_input (mA)}``;
  power of rail K = V·I.
- INA3221 via the ``ina3221x`` IIO driver (JetPack 4): ``…/iio:deviceN/{rail_nameK, in_powerK_input (mW)}``.
- Linux RAPL: ``/sys/class/powercap/intel-rapl:N/{name, energy_uj, max_energy_range_uj}``, a
  cumulative counter that wraps at ``max_energy_range_uj``.
- NVIDIA GPUs through NVML (preset sensor ``{kind: nvml, path: "nvml:INDEX"}``), see
  :mod:`moec.hardware.nvml_energy`; ``pynvml`` is optional and imported only when such a meter is made.

Only the standard library is required: the device-side sampler process imports these modules alone.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from moec.hardware.nvml_energy import NvmlMeter, parse_index


def _read_num(path: Path) -> float:
    return float(path.read_text().strip())


class RailPowerMeter:
    """Instantaneous power (W) of named rails of one INA3221 (hwmon or ina3221x layout)."""

    cumulative = False

    def __init__(self, directory: str | os.PathLike, rail: str | None = None) -> None:
        self.dir = Path(directory)
        self.channels = self._channels()
        if not self.channels:
            raise FileNotFoundError(f"no INA3221 channels under {self.dir}")
        if rail is not None:
            picked = {k: v for k, v in self.channels.items() if v[0] == rail}
            if not picked:
                names = ", ".join(v[0] for v in self.channels.values())
                raise FileNotFoundError(f"rail {rail!r} not found under {self.dir} (rails: {names})")
            self.channels = picked
        elif any(v[0] == "VDD_IN" for v in self.channels.values()):
            # Orin NX/Nano: VDD_IN is the module input; the other rails are parts of it
            self.channels = {k: v for k, v in self.channels.items() if v[0] == "VDD_IN"}
        self.kind = "ina3221"
        self.name = f"ina3221:{self.dir}:{'+'.join(v[0] for v in self.channels.values())}"

    def _channels(self) -> dict[int, tuple[str, list[Path]]]:
        out: dict[int, tuple[str, list[Path]]] = {}
        for label in sorted(self.dir.glob("in*_label")):
            k = label.name[2:-len("_label")]
            volt, curr = self.dir / f"in{k}_input", self.dir / f"curr{k}_input"
            if k.isdigit() and volt.is_file() and curr.is_file():
                out[int(k)] = (label.read_text().strip(), [volt, curr])
        for power in sorted(self.dir.glob("in_power*_input")):  # JetPack 4 ina3221x
            k = power.name[len("in_power"):-len("_input")]
            name = self.dir / f"rail_name_{k}"
            label = name.read_text().strip() if name.is_file() else f"rail{k}"
            if k.isdigit():
                out[int(k)] = (label, [power])
        return out

    def rails(self) -> list[str]:
        return [label for label, _ in self.channels.values()]

    def read(self) -> float:
        total = 0.0
        for _, files in self.channels.values():
            if len(files) == 2:
                total += _read_num(files[0]) * _read_num(files[1]) * 1e-6  # mV * mA -> W
            else:
                total += _read_num(files[0]) * 1e-3  # mW -> W
        return total


class RaplMeter:
    """Cumulative energy (J) of one RAPL domain, unwrapped at ``max_energy_range_uj``."""

    cumulative = True

    def __init__(self, energy_file: str | os.PathLike) -> None:
        self.file = Path(energy_file)
        if not self.file.is_file():
            raise FileNotFoundError(f"no RAPL counter {self.file}")
        rng = self.file.parent / "max_energy_range_uj"
        self.range_uj = _read_num(rng) if rng.is_file() else float(2**32)
        self.kind = "rapl"
        self.name = f"rapl:{self.file.parent.name}"

    def read(self) -> float:
        return _read_num(self.file) * 1e-6

    def delta(self, before_j: float, after_j: float) -> float:
        d = after_j - before_j
        return d + self.range_uj * 1e-6 if d < 0 else d  # the counter wrapped once


def _under(root: str | os.PathLike, path: str) -> str:
    return str(Path(root) / path.lstrip("/"))


def discover_meters(root: str | os.PathLike = "/") -> list:
    """Every meter found under ``root``: INA3221 (hwmon, ina3221x) and top-level RAPL packages."""
    meters: list = []
    for d in sorted(glob.glob(_under(root, "/sys/bus/i2c/devices/*/hwmon/hwmon*"))):
        name = Path(d) / "name"
        if name.is_file() and name.read_text().strip().startswith("ina3221"):
            try:
                meters.append(RailPowerMeter(d))
            except FileNotFoundError:
                pass
    for d in sorted(glob.glob(_under(root, "/sys/bus/i2c/drivers/ina3221x/*/iio:device*"))):
        try:
            meters.append(RailPowerMeter(d))
        except FileNotFoundError:
            pass
    for f in sorted(glob.glob(_under(root, "/sys/class/powercap/intel-rapl:*/energy_uj"))):
        if Path(f).parent.name.count(":") == 1:  # packages, not their sub-domains (counted inside)
            meters.append(RaplMeter(f))
    if str(root) == "/":  # NVML reads the real driver: never under a fixture root
        try:
            meters.append(NvmlMeter(0))
        except FileNotFoundError:
            pass
    return meters


def meters_for(sensors: list[dict], root: str | os.PathLike = "/") -> list:
    """Meters of a preset's ``power_sensors`` (kind ``rapl`` / ``ina3221`` / ``ina3221x`` / ``nvml``) that exist.

    Falls back to :func:`discover_meters` when the preset lists none or none of them exists.
    """
    out = []
    for s in sensors:
        path = _under(root, s["path"])
        try:
            if s["kind"] == "nvml":
                out.append(NvmlMeter(parse_index(s["path"])))
            elif s["kind"] == "rapl":
                out.append(RaplMeter(path))
            elif s["kind"] in ("ina3221", "ina3221x"):
                for d in sorted(glob.glob(path)) or [path]:
                    out.append(RailPowerMeter(d, s.get("rail")))
        except FileNotFoundError:
            continue
    return _without_double_counts(out) or discover_meters(root)


def _without_double_counts(meters: list) -> list:
    """Drop rails of a device whose ``VDD_IN`` (the module's input, Orin NX/Nano) is also metered:
    the other rails are parts of it."""
    total_dirs = {m.dir for m in meters if isinstance(m, RailPowerMeter) and m.rails() == ["VDD_IN"]}
    return [m for m in meters if not (isinstance(m, RailPowerMeter) and m.dir in total_dirs
                                      and m.rails() != ["VDD_IN"])]


@dataclass
class EnergyReading:
    joules: float
    seconds: float
    samples: int
    meters: list[str] = field(default_factory=list)

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else float("nan")


class Sampler:
    """Samples ``meters`` every ``period_s`` in a thread; ``stop()`` integrates to joules.

    Power meters are integrated by the trapezoid rule over their samples; cumulative counters
    by summing unwrapped deltas between consecutive samples (a wrap between two samples is
    detected as a negative step).
    """

    def __init__(self, meters: list, period_s: float = 0.02) -> None:
        if not meters:
            raise ValueError("no meters to sample")
        self.meters, self.period = meters, period_s
        self._stop = threading.Event()
        self._t: list[float] = []
        self._v: list[list[float]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self._t.append(time.monotonic())
        self._v.append([m.read() for m in self.meters])

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def start(self) -> "Sampler":
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> EnergyReading:
        self._stop.set()
        self._thread.join()
        self._sample()
        joules = 0.0
        for j, m in enumerate(self.meters):
            vals = [v[j] for v in self._v]
            for i in range(1, len(vals)):
                if m.cumulative:
                    joules += m.delta(vals[i - 1], vals[i])
                else:
                    joules += 0.5 * (vals[i - 1] + vals[i]) * (self._t[i] - self._t[i - 1])
        return EnergyReading(joules, self._t[-1] - self._t[0], len(self._t), [m.name for m in self.meters])
