"""``make test`` runs 2 xdist workers with ``--dist loadgroup``: tests marked with one ``xdist_group`` must
all run on one worker (the emulated arm64 device's modules share its folder; grouped modules build their
bundles once). A probe module of grouped and ungrouped tests is run in a subprocess with the plugin."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = '''
import os
import pytest

@pytest.mark.xdist_group("probe")
@pytest.mark.parametrize("i", range(8))
def test_grouped(i, tmp_path_factory):
    (OUT / f"grouped-{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.parametrize("i", range(8))
def test_free(i):
    (OUT / f"free-{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])
'''


def test_a_group_runs_on_one_worker(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_probe.py").write_text(f"from pathlib import Path\nOUT = Path({str(out)!r})\n" + PROBE)
    res = subprocess.run([sys.executable, "-m", "pytest", "-v", "-n", "2", "--dist", "loadgroup", "-p",
                          "tests.xdist_groups", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          str(tmp_path / "test_probe.py")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    # the scheduler groups by the node id's "@group" suffix (which pytest 9 dropped without the plugin)
    assert len(re.findall(r"PASSED \S+::test_grouped\[\d\]@probe", res.stdout)) == 8, res.stdout
    assert len(re.findall(r"PASSED \S+::test_free\[\d\]\s", res.stdout)) == 8, res.stdout
    grouped = {(out / f"grouped-{i}").read_text() for i in range(8)}
    assert len(grouped) == 1, grouped  # so every grouped test ran on one worker
    assert {(out / f"free-{i}").read_text() for i in range(8)} <= {"gw0", "gw1"}
