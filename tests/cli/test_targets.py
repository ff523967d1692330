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
