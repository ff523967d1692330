"""A killed search resumes from its checkpointed state and finishes with the same plan as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.search.cost import CostConfig
from moec.search.driver import SearchOptions, run_search
from moec.search.estimator import AnalyticEstimator, PlanMeasurement
from tests.search.problems import synthetic_problem

REPO = Path(__file__).resolve().parents[2]


class Interrupt(Exception):
    pass


def _abort_at(n):
    def hook(ep):
        if ep == n:
            raise Interrupt
    return hook


def test_resume_after_exception_gives_the_same_plan(tmp_path):
    p = synthetic_problem(3, 6, seed=7, budget_frac=0.4)
    cfg = CostConfig(1.0, 0.5, 0.1, "none")
    est = AnalyticEstimator(kernel_overhead_s=3e-6)
    calls = []

    def device(plan):  # deterministic test double, logged to count repeats
        calls.append(1)
        return PlanMeasurement(1e-4 + 1e-6 * sum(b for l in plan.experts.values() for b in l.values()), None)

    whole = run_search(p, cfg, est, SearchOptions(policy="rl", episodes=60, seed=3, state_path=str(tmp_path / "a.json"),
                                                  measurer=device, measure_every=15))
    n_whole = len(calls)
    calls.clear()
    state = tmp_path / "b.json"
    opts = dict(policy="rl", episodes=60, seed=3, state_path=str(state), measurer=device, measure_every=15)
    with pytest.raises(Interrupt):
        run_search(p, cfg, est, SearchOptions(**opts, on_episode=_abort_at(37)))
    assert json.loads(state.read_text())["episode"] == 30  # last checkpoint before the interruption
    resumed = run_search(p, cfg, est, SearchOptions(**opts))
    assert np.array_equal(resumed.assign, whole.assign)
    assert resumed.cost.total == whole.cost.total
    assert resumed.plan.to_json()["experts"] == whole.plan.to_json()["experts"]
    assert len(calls) <= n_whole + 1  # measurements already in the state are not repeated
    # a finished state resumes to the same plan at once
    again = run_search(p, cfg, est, SearchOptions(**opts))
    assert np.array_equal(again.assign, whole.assign)


def test_state_of_another_search_is_refused(tmp_path):
    p = synthetic_problem(2, 4, seed=1)
    state = str(tmp_path / "s.json")
    run_search(p, CostConfig(), AnalyticEstimator(), SearchOptions(policy="rl", episodes=10, state_path=state))
    with pytest.raises(MoecError, match="different search.*alpha"):
        run_search(p, CostConfig(alpha=2.0), AnalyticEstimator(), SearchOptions(policy="rl", episodes=10,
                                                                                state_path=state))
    Path(state).write_text("{not json")
    with pytest.raises(MoecError, match="corrupt"):
        run_search(p, CostConfig(), AnalyticEstimator(), SearchOptions(policy="rl", episodes=10, state_path=state))


def test_killed_subprocess_resumes_to_the_same_plan(tiny_profiled, tmp_path):
    ckpt, _, prof = tiny_profiled
    args = ["search", str(ckpt), "--profile", str(prof), "--episodes", "300", "--seed", "4", "--budget-mb", "0.1",
            "--tensor-bits", "re:.*=8"]
    state, out = tmp_path / "state.json", tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = "from moec.cli.main import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--state", str(state), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not state.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    killed_at = json.loads(state.read_text())["episode"]
    assert 0 < killed_at < 300
    res = CliRunner().invoke(cli, [*args, "--state", str(state), "--out", str(out)])
    assert res.exit_code == 0, res.output
    ref = CliRunner().invoke(cli, [*args, "--state", str(tmp_path / "ref.json"), "--out", str(tmp_path / "ref.json.plan")])
    assert ref.exit_code == 0, ref.output
    got, want = json.loads(out.read_text()), json.loads((tmp_path / "ref.json.plan").read_text())
    assert got["experts"] == want["experts"]
    assert got["provenance"]["cost"] == want["provenance"]["cost"]
