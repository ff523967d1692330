"""Fixture directories reproducing real power-sensor sysfs layouts (Jetson INA3221, JetPack 4, RAPL)."""

from __future__ import annotations

from pathlib import Path

#: Jetson Orin NX/Nano rails (JetPack 5/6 hwmon): label, mV, mA
ORIN_NX_RAILS = [("VDD_IN", 5072, 1420), ("VDD_CPU_GPU_CV", 5064, 430), ("VDD_SOC", 5064, 610)]
#: AGX Orin rails (no VDD_IN: the rails are summed)
AGX_ORIN_RAILS = [("VDD_GPU_SOC", 5080, 1200), ("VDD_CPU_CV", 5080, 400), ("VIN_SYS_5V0", 5000, 300)]


def write_hwmon(root: Path, rails, device: str = "1-0040", hwmon: str = "hwmon3") -> Path:
    """/sys/bus/i2c/devices/<dev>/hwmon/<hwmon>/{name, inN_label, inN_input, currN_input} under root."""
    d = root / "sys/bus/i2c/devices" / device / "hwmon" / hwmon
    d.mkdir(parents=True)
    (d / "name").write_text("ina3221\n")
    for i, (label, mv, ma) in enumerate(rails, start=1):
        (d / f"in{i}_label").write_text(label + "\n")
        (d / f"in{i}_input").write_text(f"{mv}\n")
        (d / f"curr{i}_input").write_text(f"{ma}\n")
        (d / f"in{i + 3}_input").write_text("12\n")  # shunt voltages: not rails, must be ignored
    return d


def write_ina3221x(root: Path, rails_mw, device: str = "1-0040") -> Path:
    """JetPack 4: /sys/bus/i2c/drivers/ina3221x/<dev>/iio:device0/{rail_name_N, in_powerN_input (mW)}."""
    d = root / "sys/bus/i2c/drivers/ina3221x" / device / "iio:device0"
    d.mkdir(parents=True)
    for i, (label, mw) in enumerate(rails_mw):
        (d / f"rail_name_{i}").write_text(label + "\n")
        (d / f"in_power{i}_input").write_text(f"{mw}\n")
        (d / f"in_voltage{i}_input").write_text("5000\n")
        (d / f"in_current{i}_input").write_text(f"{mw // 5}\n")
    return d


def write_rapl(root: Path, energy_uj: int, max_range_uj: int = 262143328850, package: int = 0) -> Path:
    """/sys/class/powercap/intel-rapl:N/{name, energy_uj, max_energy_range_uj} plus a core sub-domain."""
    d = root / "sys/class/powercap" / f"intel-rapl:{package}"
    d.mkdir(parents=True)
    (d / "name").write_text(f"package-{package}\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    sub = root / "sys/class/powercap" / f"intel-rapl:{package}:0"
    sub.mkdir()
    (sub / "name").write_text("core\n")
    (sub / "energy_uj").write_text("5\n")
    (sub / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return d / "energy_uj"
