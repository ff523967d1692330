"""The shipped target presets: fields, TVM targets, user preset files and the errors of bad ones."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.core.targets import builtin_names, install_hint, load_target
from moec.lower.backends import backend_for

EDGE = ["aarch64-generic", "raspberry-pi-5", "jetson-orin-nano", "jetson-agx-orin"]


def test_all_presets_are_shipped():
    assert set(builtin_names()) >= {"host", *EDGE}


@pytest.mark.parametrize("name", EDGE)
def test_edge_preset_fields(name):
    p = load_target(name)
    assert p.cross_compiler == "aarch64-linux-gnu-g++" and p.rpc_key == name
    assert p.memory_budget_mb > 0 and p.allowed_bits
    assert p.energy_model.source and "estimate" in p.energy_model.source


@pytest.mark.tvm
def test_cpu_preset_targets():
    from tvm.target import codegen
    generic = load_target("aarch64-generic").tvm()
    assert str(generic.attrs["mtriple"]).startswith("aarch64") and not codegen.target_has_features("dotprod", generic)
    rpi = load_target("raspberry-pi-5").tvm()
    assert rpi.attrs["mcpu"] == "cortex-a76" and codegen.target_has_features("dotprod", rpi)
    assert load_target("raspberry-pi-5").power_sensors == []  # no power meter: energy is modelled


@pytest.mark.tvm
@pytest.mark.parametrize("name", ["jetson-orin-nano", "jetson-agx-orin"])
def test_jetson_targets_have_the_orin_host(name):
    t = load_target(name).tvm()
    assert t.kind.name == "cuda" and t.attrs["arch"] == "sm_87"
    # TVM's own orin-nano tag says carmel (Xavier); Orin's CPU is the Cortex-A78AE.
    assert t.host.attrs["mcpu"] == "cortex-a78ae" and str(t.host.attrs["mtriple"]).startswith("aarch64")
    sensors = load_target(name).power_sensors
    assert sensors and all(s.kind == "ina3221" and s.rail for s in sensors)


def test_cli_lists_and_shows_every_preset():
    res = CliRunner().invoke(cli, ["targets"])
    assert res.exit_code == 0
    for name in ["host", *EDGE]:
        assert name in res.output
    res = CliRunner().invoke(cli, ["targets", "show", "jetson-agx-orin"])
    assert res.exit_code == 0 and "cortex-a78ae" in res.output and "sm_87" in res.output


def _user_preset(tmp_path, **changes):
    data = load_target("raspberry-pi-5").model_dump()
    data.update(name="my-board", **changes)
    path = tmp_path / "my-board.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_user_preset_file(tmp_path):
    path = _user_preset(tmp_path, rpc_key="board-7")
    assert load_target(path).rpc_key == "board-7"
    res = CliRunner().invoke(cli, ["targets", "show", str(path)])
    assert res.exit_code == 0 and "board-7" in res.output


def test_unknown_target_lists_choices():
    res = CliRunner().invoke(cli, ["targets", "show", "raspberry-pi-6"])
    assert res.exit_code == 2
    assert "unknown target 'raspberry-pi-6'; choices:" in res.output and "jetson-agx-orin" in res.output


@pytest.mark.parametrize("change, field", [({"memory_budget_mb": -1}, "memory_budget_mb"),
                                          ({"rpc_kee": "x"}, "rpc_kee"),
                                          ({"energy_model": {"pj_per_byte": 1.0, "pj_per_op": 1.0}},
                                           "energy_model.source")])
def test_bad_field_is_named(tmp_path, change, field):
    with pytest.raises(MoecError, match=f"field '{field}'"):
        load_target(_user_preset(tmp_path, **change))


@pytest.mark.tvm
@pytest.mark.parametrize("field", ["tvm_target", "tvm_host"])
def test_bad_tvm_target_is_named(tmp_path, field):
    path = _user_preset(tmp_path, **{field: {"kind": "llvm", "mcpux": "cortex-a76"}})
    with pytest.raises(MoecError, match=f"field '{field}': Unknown config option 'mcpux'"):
        load_target(path).tvm()


def test_missing_cross_compiler_names_the_package(tmp_path):
    preset = load_target(_user_preset(tmp_path, cross_compiler="riscv64-nowhere-linux-gnu-g++"))
    with pytest.raises(MoecError, match="apt-get install g\\+\\+-riscv64-nowhere-linux-gnu"):
        backend_for(preset).require_toolchain(preset)
    assert install_hint("aarch64-linux-gnu-g++") == "install it with: apt-get install g++-aarch64-linux-gnu"
