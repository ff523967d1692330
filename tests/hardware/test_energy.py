"""Power meters on fixture sysfs trees, sampling/integration, and the modelled energy."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from moec.hardware.energy import RailPowerMeter, RaplMeter, Sampler, discover_meters, meters_for
from moec.hardware.energy_model import decode_energy_j, decode_traffic
from moec.core.targets import load_target
from moec.core.config import MoEConfig
from moec.quant.pack import packed_nbytes
from moec.core.plan import uniform_plan
from tests.hardware.sensor_fixtures import (AGX_ORIN_RAILS, ORIN_NX_RAILS, write_hwmon, write_ina3221x,
                                            write_rapl)


def test_orin_nx_uses_vdd_in_only(tmp_path):
    d = write_hwmon(tmp_path, ORIN_NX_RAILS)
    m = RailPowerMeter(d)
    assert m.read() == pytest.approx(5.072 * 1.420)  # VDD_IN, the others are parts of it
    assert "VDD_IN" in m.name


def test_agx_orin_sums_rails_and_selects_one(tmp_path):
    d = write_hwmon(tmp_path, AGX_ORIN_RAILS)
    assert RailPowerMeter(d).read() == pytest.approx(sum(mv * ma for _, mv, ma in AGX_ORIN_RAILS) * 1e-6)
    assert RailPowerMeter(d, rail="VDD_CPU_CV").read() == pytest.approx(5.080 * 0.400)
    with pytest.raises(FileNotFoundError, match="VDD_NOPE.*VDD_GPU_SOC"):
        RailPowerMeter(d, rail="VDD_NOPE")


def test_jetpack4_in_power_layout(tmp_path):
    d = write_ina3221x(tmp_path, [("POM_5V_IN", 3100), ("POM_5V_GPU", 400), ("POM_5V_CPU", 700)])
    assert RailPowerMeter(d).read() == pytest.approx(4.2)
    assert RailPowerMeter(d, "POM_5V_IN").read() == pytest.approx(3.1)


def test_rapl_wraparound(tmp_path):
    f = write_rapl(tmp_path, energy_uj=999_000_000, max_range_uj=1_000_000_000)
    m = RaplMeter(f)
    before = m.read()
    f.write_text("4000000\n")  # wrapped: 1 J to the top, then 4 J
    assert m.delta(before, m.read()) == pytest.approx(5.0)


def test_discover_finds_every_layout_and_skips_subdomains(tmp_path):
    write_hwmon(tmp_path, ORIN_NX_RAILS)
    write_ina3221x(tmp_path, [("POM_5V_IN", 3000)])
    write_rapl(tmp_path, 10)
    kinds = sorted(m.kind for m in discover_meters(tmp_path))
    assert kinds == ["ina3221", "ina3221", "rapl"]
    assert discover_meters(tmp_path / "empty") == []


def test_meters_for_preset_sensors(tmp_path):
    write_rapl(tmp_path, 10)
    preset = load_target("host")  # lists /sys/class/powercap/intel-rapl:0/energy_uj
    meters = meters_for([s.model_dump() for s in preset.power_sensors], tmp_path)
    assert [m.kind for m in meters] == ["rapl"]
    assert meters_for([s.model_dump() for s in preset.power_sensors], tmp_path / "none") == []
    write_hwmon(tmp_path / "jetson", ORIN_NX_RAILS)  # the listed RAPL file is absent: discovered meters
    assert [m.kind for m in meters_for([s.model_dump() for s in preset.power_sensors], tmp_path / "jetson")] == \
        ["ina3221"]


def test_sampler_integrates_power_and_counters(tmp_path):
    d = write_hwmon(tmp_path, [("VDD_IN", 5000, 2000)])  # 10 W
    f = write_rapl(tmp_path, 0, max_range_uj=2_000_000)
    stop = threading.Event()
    tmp = tmp_path / "energy_uj.tmp"

    def counter():  # 3 W of "energy_uj", wrapping every 2 J
        t0, uj = time.monotonic(), 0
        while not stop.is_set():
            uj = int((time.monotonic() - t0) * 3e6)
            tmp.write_text(f"{uj % 2_000_000}\n")
            os.replace(tmp, f)  # sysfs reads never see a half-written value
            time.sleep(0.002)

    th = threading.Thread(target=counter)
    th.start()
    try:
        s = Sampler([RailPowerMeter(d), RaplMeter(f)], period_s=0.01).start()
        time.sleep(1.0)
        r = s.stop()
    finally:
        stop.set()
        th.join()
    assert r.samples > 10
    assert r.watts == pytest.approx(13.0, rel=0.15)


def test_modelled_energy_counts_routed_expert_bytes():
    cfg = MoEConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                    top_k=2, expert_intermediate=64)
    plan = uniform_plan(cfg, 4, 32)
    base, _ = decode_traffic(cfg, plan, np.zeros((2, 4)))
    one, _ = decode_traffic(cfg, plan, np.array([[1, 0, 0, 0], [0, 0, 0, 0]], float))
    assert one - base == pytest.approx(3 * packed_nbytes(64, 64, 4, 32)["total"])
    plan8 = uniform_plan(cfg, 8, 32)
    em = load_target("host").energy_model
    assert decode_energy_j(cfg, plan8, em) > decode_energy_j(cfg, plan, em) > 0


def test_preset_rails_of_one_ina3221(tmp_path):
    glob_path = "/sys/bus/i2c/devices/1-0040/hwmon/hwmon*"
    nano = [{"kind": "ina3221", "path": glob_path, "rail": r} for r in ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC")]
    write_hwmon(tmp_path / "nano", ORIN_NX_RAILS)
    meters = meters_for(nano, tmp_path / "nano")
    assert sum(m.read() for m in meters) == pytest.approx(5.072 * 1.420)  # VDD_IN only: the rest is inside it
    agx = [{"kind": "ina3221", "path": glob_path, "rail": r} for r in ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")]
    write_hwmon(tmp_path / "agx", AGX_ORIN_RAILS)
    meters = meters_for(agx, tmp_path / "agx")
    assert len(meters) == 3
    assert sum(m.read() for m in meters) == pytest.approx(sum(mv * ma for _, mv, ma in AGX_ORIN_RAILS) * 1e-6)
