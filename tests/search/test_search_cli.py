"""`moec search` end to end on a tiny checkpoint: plan, plots, exact memory, one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.models.checkpoint import load_checkpoint
from moec.quant.accounting import plan_memory
from moec.core.plan import resolve_plan


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.mark.parametrize("policy", ["uniform", "greedy", "ilp", "rl"])
def test_search_writes_a_valid_plan_within_budget(tiny_profiled, tmp_path, policy):
    ckpt, _, prof = tiny_profiled
    out = tmp_path / "plan.json"
    code, text = run("search", ckpt, "--profile", prof, "--budget-mb", 0.1, "--policy", policy, "--episodes", 30,
                     "--out", out, "--plot-dir", tmp_path / "plots", "--tensor-bits", "re:.*=8")
    assert code == 0, text
    model = load_checkpoint(ckpt)
    plan = resolve_plan(out, model.cfg)
    mem = plan_memory(model, plan).total
    assert mem <= 0.1e6 and plan.provenance["memory_mb"] == pytest.approx(mem / 1e6)
    assert plan.provenance["policy"] == policy and plan.provenance["latency_source"] == "modelled"
    assert plan.tensor_bits("layers.0.mlp.router.weight") == 16 and plan.tensor_bits("lm_head.weight") == 8
    assert (tmp_path / "plots" / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "bits_vs_frequency.png").stat().st_size > 1000
    assert "latency (modelled)" in text and "plan written to" in text


def test_search_profiles_when_given_data(tiny_profiled, tmp_path):
    ckpt, data, _ = tiny_profiled
    out = tmp_path / "p.json"
    code, text = run("search", ckpt, "--data", data, "--policy", "ilp", "--out", out)
    assert code == 0, text
    plan = json.loads(out.read_text())
    assert plan["provenance"]["loss_source"] == "proxy sensitivity"


@pytest.mark.parametrize("extra, needle", [
    ((), "needs a profile with sensitivity"),
    (("--profile", "PROFILE", "--target", "jetson-oring"), "unknown target 'jetson-oring'; choices:"),
    (("--profile", "PROFILE", "--budget-mb", "0.001"), "below the smallest plan"),
    (("--profile", "PROFILE", "--budget-mb", "-3"), "must be positive"),
    (("--profile", "NOSENS"), "no sensitivity"),
    (("--profile", "PROFILE", "--tensor-bits", "attention8"), "bad --tensor-bits entry"),
    (("--profile", "PROFILE", "--tensor-bits", "re:.*=5"), "not allowed on the target"),
    (("--profile", "PROFILE", "--measure", "farm"), "needs --tracker"),
])
def test_errors_are_one_line(tiny_profiled, tmp_path, monkeypatch, extra, needle):
    import tempfile

    ckpt, _, prof = tiny_profiled
    scratch = tmp_path / "tmp"  # where a refused search must leave nothing (it made /tmp/moec-farm-*)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    nosens = tmp_path / "nosens.json"
    d = json.loads(prof.read_text())
    d["sensitivity"] = None
    nosens.write_text(json.dumps(d))
    subst = {"PROFILE": str(prof), "NOSENS": str(nosens)}
    code, text = run("search", ckpt, *[subst.get(a, a) for a in extra], "--out", tmp_path / "o.json")
    assert code == 2, text
    assert len(text.strip().splitlines()) == 1 and text.startswith("error:") and needle in text, text
    assert not (tmp_path / "o.json").exists()
    assert not any(scratch.iterdir())


def test_compile_searches_the_front_on_the_profile_it_has(tiny_profiled):
    """``moec compile --nested``: with a profile that has sensitivity, the front is the searched one."""
    from moec.core.plan import uniform_plan
    from moec.core.targets import load_target
    from moec.models.checkpoint import load_checkpoint
    from moec.pipeline.compile import _front_problem
    from moec.search.nested_front import nested_front, searched_front_plans
    ckpt, _, prof = tiny_profiled
    model = load_checkpoint(ckpt)
    plan = uniform_plan(model.cfg, 8, 32)
    preset = load_target("host")
    problem = _front_problem(model, plan, preset, prof)
    assert problem is not None and {2, 3, 4, 8} <= set(problem.bits)
    front = nested_front(model.cfg, plan, 8, preset, problem=problem, rungs=4)
    assert [e["experts"] for e in front] == [
        {str(l): [p.experts[l][x] for x in range(model.cfg.num_experts)] for l in model.cfg.moe_layers}
        for p in searched_front_plans(problem, 8, preset, rungs=4)]
    assert _front_problem(model, plan, preset, None) is None  # no profile: the memory ladder
