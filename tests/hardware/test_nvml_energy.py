"""NVML meter on a fake pynvml: energy counter or integrated power, preset sensors, optional import."""

from __future__ import annotations

import sys
import time

import pytest

from moec.core.targets import load_target
from moec.hardware.energy import Sampler, discover_meters, meters_for
from moec.hardware.nvml_energy import NvmlMeter, parse_index
from tests.hardware.nvml_fixture import nvml  # noqa: F401 - fixture


def _sample(meter, seconds=0.3):
    s = Sampler([meter], period_s=0.02).start()
    time.sleep(seconds)
    return s.stop()


@pytest.mark.parametrize("counter", [True, False])
def test_nvml_energy_matches_the_power_drawn(nvml, counter):
    nvml(watts=200.0, energy_counter=counter)
    m = NvmlMeter(0)
    assert m.cumulative is counter and m.name == f"nvml:0:NVIDIA Fake GPU:{'energy' if counter else 'power'}"
    r = _sample(m)
    assert r.samples >= 5 and r.meters == [m.name]
    assert r.joules == pytest.approx(200.0 * r.seconds, rel=0.05)  # 1 mJ counter steps: within 5 %


def test_counter_reads_joules_and_never_goes_back(nvml):
    m = NvmlMeter(0)
    assert m.read() == pytest.approx(5000.0, abs=5)  # 5e6 mJ at start
    assert m.delta(10.0, 4.0) == 0.0 and m.delta(4.0, 10.5) == 6.5
    m.close()
    assert sys.modules["pynvml"].calls == ["init", "shutdown"]


@pytest.mark.parametrize("kwargs, needle", [({"driver": False}, "Driver Not Loaded"),
                                            ({"gpus": 0}, "NVML GPU 0 is not available")])
def test_no_driver_or_gpu_is_not_a_meter(nvml, kwargs, needle):
    nvml(**kwargs)
    with pytest.raises(FileNotFoundError, match=needle):
        NvmlMeter(0)


def test_without_pynvml_there_is_no_meter(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(FileNotFoundError, match="pip install nvidia-ml-py"):
        NvmlMeter(0)
    assert meters_for([{"kind": "nvml", "path": "nvml:0"}], tmp_path) == []  # nothing under the fixture root


def test_cuda_preset_sensor_is_an_nvml_meter(nvml, tmp_path):
    nvml(gpus=2)
    sensors = [s.model_dump() for s in load_target("cuda:sm_90").power_sensors]
    meters = meters_for(sensors, tmp_path)
    assert [m.kind for m in meters] == ["nvml"] and meters[0].index == 0
    assert meters_for([{"kind": "nvml", "path": "nvml:1"}], tmp_path)[0].index == 1
    assert parse_index("nvml") == 0
    with pytest.raises(ValueError, match="nvml:INDEX"):
        parse_index("nvml:gpu")


def test_discovery_finds_nvml_only_on_the_real_root(nvml, tmp_path):
    assert discover_meters(tmp_path) == []  # a fixture root never reports the real driver
    assert [m.kind for m in discover_meters("/") if m.kind == "nvml"] == ["nvml"]
