"""Target presets: listing, showing, strict validation of user preset files."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.core.targets import builtin_names, load_target


def test_every_builtin_preset_loads():
    for name in builtin_names():
        preset = load_target(name)
        assert preset.name == name and preset.energy_model.source


def test_list_and_show():
    res = CliRunner().invoke(cli, ["targets"])
    assert res.exit_code == 0 and "host" in res.output
    res = CliRunner().invoke(cli, ["targets", "show", "host"])
    assert res.exit_code == 0 and "tvm_target" in res.output


def test_unknown_name_lists_choices():
    with pytest.raises(MoecError, match="unknown target 'jetson-oring'; choices: .*host"):
        load_target("jetson-oring")


@pytest.mark.parametrize("extra, needle", [("bogus: 1\n", "bogus"), ("allowed_bits: [7]\n", "allowed_bits")])
def test_bad_user_preset(tmp_path, extra, needle):
    text = (tmp_path / "p.yaml")
    base = load_target("host").model_dump()
    import yaml
    base.pop("allowed_bits")
    text.write_text(yaml.safe_dump(base) + extra + ("allowed_bits: [4]\n" if "allowed_bits" not in extra else ""))
    with pytest.raises(MoecError, match=needle):
        load_target(text)


def _fake_nvidia_smi(tmp_path, monkeypatch, output: str, rc: int = 0):
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {rc}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tool.parent))
    monkeypatch.delenv("MOEC_CUDA_ARCH", raising=False)


def test_cuda_preset_arch_named_env_detected_default(tmp_path, monkeypatch):
    from moec.core.targets import DEFAULT_CUDA_ARCH
    _fake_nvidia_smi(tmp_path, monkeypatch, "8.9\\n8.9\\n")
    assert load_target("cuda").tvm_target["arch"] == "sm_89"  # detected (first GPU)
    monkeypatch.setenv("MOEC_CUDA_ARCH", "sm_90")
    assert load_target("cuda").tvm_target["arch"] == "sm_90"
    assert load_target("cuda:sm_86").tvm_target["arch"] == "sm_86"  # the name wins
    monkeypatch.delenv("MOEC_CUDA_ARCH")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert load_target("cuda").tvm_target["arch"] == DEFAULT_CUDA_ARCH == "sm_80"


def test_cuda_preset_failing_nvidia_smi_falls_back(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA-SMI has failed\\n", rc=9)
    assert load_target("cuda").tvm_target["arch"] == "sm_80"


@pytest.mark.parametrize("name, needle", [("cuda:foo", "bad CUDA arch 'foo'"), ("host:sm_90", "takes no ':sm_90'")])
def test_bad_cuda_arch_is_one_line(name, needle):
    with pytest.raises(MoecError, match=needle):
        load_target(name)


def test_targets_lists_the_cuda_preset(monkeypatch):
    monkeypatch.setenv("MOEC_CUDA_ARCH", "sm_86")
    res = CliRunner().invoke(cli, ["targets"])
    line = next(ln for ln in res.output.splitlines() if ln.startswith("cuda "))
    assert "cuda sm_86 + x86_64-linux-gnu" in line and "jetson-agx-orin" in res.output
    res = CliRunner().invoke(cli, ["targets", "show", "cuda:sm_75"])
    assert res.exit_code == 0 and "arch: sm_75" in res.output
