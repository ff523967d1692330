"""Nested vs fixed decode per activation mode, each timing in a process of its own (``dynamic.py --parts modes``).

For each activation mode (``float32``, ``int8``) one nested bundle (8-bit storage, the OLMoE-shaped
random model of ``dynamic.py``) and one fixed bundle per plan are built once; then, round after round,
plan by plan and mode by mode, the nested bundle (under the plan, ``set_plan``) and the plan's fixed
bundle of that mode are each timed in a fresh process, their order alternating between rounds, with
two clocks: wall time with the session's threads, and the calling thread's CPU time with one TVM
thread (each a process of its own: TVM's pool size is fixed when it starts). A fresh process per
timing keeps one bundle's page cache, allocator and thread-pool state out of the other's figures.

Usage (as a part of ``dynamic.py``)::

    python benchmarks/dynamic.py --parts modes --rounds 3 --steps 48 [--modes float32,int8]
        [--plans "uniform 8,uniform 4"] [--clocks wall,cpu]

or a single timing (what each process runs)::

    python benchmarks/dynamic_modes.py --time BUNDLE [--plan PLAN.json] --steps 48 --clock cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def build(layers: int, gs: int, plans: dict, modes: list[str], root: Path) -> dict:
    """{(mode, "nested" | plan name): bundle path}; the plans' JSON files under ``root``."""
    from dynamic import olmoe_shaped
    from moec.core.run_plan import storage_plan
    from moec.core.targets import load_target
    from moec.lower.bundler import build_bundle_from_params
    from moec.lower.params import build_nested_params, build_params
    from moec.quant.weights import random_weights

    big, preset, out = olmoe_shaped(layers), load_target("host"), {}
    first = next(iter(plans.values()))
    for mode in modes:
        t0 = time.time()
        w8 = random_weights(big, storage_plan(first, 8))
        params = build_nested_params(big, first, w8.packed, w8.floats, 8)
        del w8
        out[mode, "nested"] = build_bundle_from_params(big, first, params, preset, root / f"nested_{mode}", None,
                                                       activations=mode,
                                                       extra_manifest={"nested": {"storage_bits": 8}})
        del params
        for i, (name, plan) in enumerate(plans.items()):
            w = random_weights(big, plan)
            fparams = build_params(big, plan, w.packed, w.floats)
            del w
            out[mode, name] = build_bundle_from_params(big, plan, fparams, preset, root / f"fixed{i}_{mode}", None,
                                                       activations=mode)
            del fparams
        print(f"({mode}: nested + {len(plans)} fixed bundles built in {time.time() - t0:.0f} s)", flush=True)
    for i, (name, plan) in enumerate(plans.items()):
        plan.save(root / f"plan{i}.json")
    return out


def _child(bundle: Path, plan: Path | None, steps: int, clock: str) -> float:
    """Median decode-step seconds of ``bundle`` in a fresh process."""
    cmd = [sys.executable, __file__, "--time", str(bundle), "--steps", str(steps), "--clock", clock]
    if plan is not None:
        cmd += ["--plan", str(plan)]
    env = dict(os.environ)
    if clock == "cpu":
        env["TVM_NUM_THREADS"] = "1"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise SystemExit(f"timing process failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["seconds"]


def modes_part(layers: int, gs: int, steps: int, rounds: int, modes: list[str], plan_names: list[str] | None,
               clocks: list[str]) -> None:
    from dynamic import _speed_plans, olmoe_shaped
    plans = _speed_plans(olmoe_shaped(layers), gs)
    if plan_names:
        plans = {name: plans[name] for name in plan_names}
    print(f"\n## Decode per activation mode: nested vs fixed, each timing a fresh process (OLMoE-shaped random "
          f"model, {layers} layers, group {gs}; {rounds} rounds, order alternating; median of {steps} steps a "
          f"process; load average {_load()} at the start)\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="moec-modes-") as d:
        root = Path(d)
        paths = build(layers, gs, plans, modes, root)
        times = {}  # (clock, mode, plan, kind) -> [seconds per round]
        for r in range(rounds):
            for i, name in enumerate(plans):
                for mode in modes:
                    pair = [("nested", paths[mode, "nested"], root / f"plan{i}.json"),
                            ("fixed", paths[mode, name], None)]
                    for clock in clocks:
                        for kind, bundle, plan in (pair if (r + i) % 2 == 0 else pair[::-1]):
                            times.setdefault((clock, mode, name, kind), []).append(
                                _child(bundle, plan, steps, clock))
            print(f"(round {r + 1} done, load average {_load()})", flush=True)
    for clock in clocks:
        how = "wall time, the session's threads" if clock == "wall" else "CPU time of the calling thread, 1 TVM thread"
        print(f"\n{how}:\n")
        print("| activations | plan | nested tok/s | fixed tok/s | nested / fixed speed | per round |")
        print("|---|---|---|---|---|---|")
        for mode in modes:
            for name in plans:
                nt, ft = times[clock, mode, name, "nested"], times[clock, mode, name, "fixed"]
                ratios = [f / n for n, f in zip(nt, ft)]
                print(f"| {mode} | {name} | {1 / statistics.median(nt):.1f} | {1 / statistics.median(ft):.1f} | "
                      f"{statistics.median(ratios):.2f} | {' / '.join(f'{x:.2f}' for x in ratios)} |")
    print(f"\n(load average {_load()} at the end)")


def _time_one(bundle: str, plan: str | None, steps: int, clock: str) -> None:
    from dynamic import _decode_times
    from moec.runtime.session import BundleSession
    threads, fn = (1, time.thread_time) if clock == "cpu" else (None, time.perf_counter)
    with BundleSession(bundle, threads=threads) as sess:
        if plan:
            sess.set_plan(plan)
        _decode_times(sess, 8, fn)  # warm: pages mapped, pool started
        print(json.dumps({"seconds": _decode_times(sess, steps, fn)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", required=True, help="Bundle to time (one process's work).")
    ap.add_argument("--plan", default=None)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    _time_one(a.time, a.plan, a.steps, a.clock)
