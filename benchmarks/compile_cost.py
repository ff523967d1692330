"""Compile cost and bundle load of moec, before vs after, side by side: seconds, CPU seconds, peak RSS.

Runs the real CLI (one process per compile, the RSS of its whole process tree sampled every
0.1 s) for each code tree given (``--before DIR`` is a checkout of the older moec, e.g. a
``git worktree`` of main; the "after" tree is this repository) and each plan: ``uniform:4``
(mse, the uniform default) and a mixed plan (experts alternating 2/4 bits, other weights 8-bit,
``--method mse``). The after tree runs with a fresh quantization cache (``--quant-cache``):
``uniform:4`` fills it, the mixed plan then finds its 4-bit experts there, and the mixed plan
compiled again hits everything (the "search compiles many plans" case). CPU seconds
(user + system of the process tree) are printed next to wall seconds because the machine may be
shared: they do not grow with other processes' load the way wall time does.

Bundle load: ``BundleSession(bundle)`` seconds per GB of the after tree's first bundle, loaded
by each tree's runtime (every file hashed), and with ``trust_verified=True`` once a stamp exists
(after tree only).

    python benchmarks/compile_cost.py /work/bench-data/olmoe-l4 --before /work/wt/main-ref --work /work/bench-data/cc
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import PeakRss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GB = 1 << 30
STAGE = re.compile(r"✓ (.+?)\s+([0-9.]+) s$")


def run_measured(argv: list[str], repo: Path, log: Path, env_extra: dict | None = None) -> dict:
    """Run ``argv`` with ``PYTHONPATH=repo``: wall s, CPU s (children), peak tree RSS GiB, stage lines, rc."""
    env = {**os.environ, "PYTHONPATH": str(repo), "TVM_NUM_THREADS": "2", **(env_extra or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ PYTHONPATH={repo} {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=repo, text=True)
        with PeakRss(proc.pid) as peak:
            text = proc.stdout.read()
            rc = proc.wait()
        out.write(text)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stages = {m.group(1).strip(): float(m.group(2)) for m in map(STAGE.search, text.splitlines()) if m}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu, 1), "peak_rss_gib": round(peak.peak / GB, 2),
            "stages": stages, "rc": rc, "tail": text.strip().splitlines()[-1:] if rc else []}


def moec(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from moec.cli.main import main; sys.argv[0] = 'moec'; main()", *args]


def write_mixed_plan(ckpt: Path, path: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from moec.core.plan import BitPlan
    from moec.models.checkpoint import load_config
    cfg = load_config(ckpt)
    plan = BitPlan({l: {e: (2, 4)[e % 2] for e in range(cfg.num_experts)} for l in cfg.moe_layers},
                   {"attention": 8, "lm_head": 8, "embeddings": 8, "dense_mlp": 8, "shared_experts": 8},
                   group_size=64, model_fingerprint=cfg.fingerprint(), method="mse",
                   provenance={"policy": "example-mixed-2/4"})
    path.write_text(json.dumps(plan.to_json()))
    return path


MICRO = """
import json, sys, time
import numpy as np
from moec.quant.quantize import quantize
from moec.quant.gptq import gptq_quantize
rng = np.random.default_rng(0)
w = (rng.standard_normal((1024, 2048)) * 0.02).astype(np.float32)
x = rng.standard_normal((4096, 2048)).astype(np.float32)
h = (x.T.astype(np.float64) @ x) / len(x)
out = {}
for name, fn in (("rtn", lambda: quantize(w, 4, 64, "rtn")), ("mse", lambda: quantize(w, 4, 64, "mse")),
                 ("hqq", lambda: quantize(w, 4, 64, "hqq")), ("gptq", lambda: gptq_quantize(w, 4, 64, h))):
    best = None
    for _ in range(int(sys.argv[1])):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        r = (time.perf_counter() - t0, time.process_time() - c0)
        best = r if best is None or r[0] < best[0] else best
    out[name] = best
print(json.dumps(out))
"""


def micro(repo: Path, threads: str, reps: int) -> dict:
    """Best-of-``reps`` (wall, CPU) seconds per 1024x2048 matrix at 4 bits, group 64, per method."""
    env = {**os.environ, "PYTHONPATH": str(repo), "MOEC_QUANT_THREADS": threads, "OMP_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads}
    out = subprocess.run([sys.executable, "-c", MICRO, str(reps)], env=env, cwd=repo, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}


LOAD = """
import json, resource, sys, time
from pathlib import Path
from moec.runtime.session import BundleSession
b, flag = Path(sys.argv[1]), sys.argv[2] == "1"
kw = {"trust_verified": True} if flag else {}
if flag:
    BundleSession(b, **kw).close()  # writes the stamp
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
s = BundleSession(b, **kw)
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
s.close()
gb = sum(p.stat().st_size for p in b.iterdir()) / 1e9
print(json.dumps({"gb": gb, "wall_s": t1 - t0, "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}))
"""


def load_seconds(bundle: Path, repo: Path, trust_verified: bool, stamps: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "MOEC_VERIFIED_DIR": str(stamps)}
    out = subprocess.run([sys.executable, "-c", LOAD, str(bundle), "1" if trust_verified else "0"], env=env,
                         cwd=repo, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--before", type=Path, default=None, help="Checkout of the older moec to compare with.")
    ap.add_argument("--work", type=Path, default=Path("/work/bench-data/cc"))
    ap.add_argument("--plans", default="uniform:4,mixed", help="Plans to compile [uniform:4,mixed].")
    ap.add_argument("--skip-before", default="", help="Plans not to compile with the before tree (slow runs).")
    ap.add_argument("--micro-only", action="store_true", help="Only the per-matrix quantizer timings.")
    ap.add_argument("--reps", type=int, default=3, help="Repetitions of each per-matrix timing (best kept) [3].")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "compile_cost.log"
    mixed = write_mixed_plan(args.checkpoint, work / "mixed-plan.json")
    cache = work / "quant-cache"
    if cache.exists():
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    trees_micro = [("after", REPO)] + ([("before", args.before.resolve())] if args.before is not None else [])
    print("\n| quantizer, 1024x2048, 4 bits | " + " | ".join(
        f"{t} {th} thr wall / CPU s" for t, _ in trees_micro for th in ("1", "2")) + " |")
    print("|---" * (1 + 2 * len(trees_micro)) + "|")
    res = {(t, th): micro(r, th, args.reps) for t, r in trees_micro for th in ("1", "2")}
    for m in ("rtn", "mse", "hqq", "gptq"):
        cells = [f"{res[(t, th)][m][0]:.3f} / {res[(t, th)][m][1]:.3f}" if m in res[(t, th)] else "–"
                 for t, _ in trees_micro for th in ("1", "2")]
        print(f"| {m} | " + " | ".join(cells) + " |", flush=True)
    if args.micro_only:
        return
    plans = args.plans.split(",")
    rows = []
    trees = [("after", REPO, ["--quant-cache", str(cache)])]
    if args.before is not None:  # after first: its bundle is the one both loaders load
        trees.append(("before", args.before.resolve(), []))
    runs = [(tree, repo, extra, plan, tag) for tree, repo, extra in trees for plan in plans
            for tag in (("cold", "warm") if tree == "after" and plan == "mixed" else ("",))
            if not (tree == "before" and plan in args.skip_before.split(","))]
    for tree, repo, extra, plan, tag in runs:
        spec = str(mixed) if plan == "mixed" else plan
        out = work / f"bundle-{tree}-{plan.replace(':', '')}"
        method = ["--method", "mse"] if plan == "mixed" else []
        res = run_measured(moec("compile", str(args.checkpoint), "--target", "host", "--plan", spec, *method,
                                "--out", str(out), "--force", *extra), repo, log)
        label = f"{tree} {plan}" + (f" (cache {tag or 'cold'})" if extra else "")
        pack = next((v for k, v in res["stages"].items() if k.startswith(("pack", "quantize"))), float("nan"))
        build = res["stages"].get("build", float("nan"))
        rows.append({"run": label, **res, "pack_s": pack, "build_s": build, "bundle": str(out)})
        print(f"  {label:<28} wall {res['wall_s']:7.1f} s  cpu {res['cpu_s']:7.1f} s  pack {pack:7.1f} s  "
              f"build {build:6.1f} s  peak {res['peak_rss_gib']:5.2f} GiB  rc={res['rc']} {res['tail']}", flush=True)
    print(f"load average after compiles: {os.getloadavg()}", flush=True)
    print("\n| run | wall s | CPU s | pack s | TVM build s | peak RSS GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']} | {r['cpu_s']} | {r['pack_s']} | {r['build_s']} | {r['peak_rss_gib']} |")
    print("\n| bundle load | GB | wall s/GB | CPU s/GB |\n|---|---|---|---|")
    stamps = work / "stamps"
    bundle = work / f"bundle-after-{plans[0].replace(':', '')}"  # the same bundle through each tree's loader
    for tree, repo, _ in trees:
        if not bundle.is_dir():
            continue
        modes = [(False, "every file hashed")] + ([(True, "--trust-verified, stamped")] if tree == "after" else [])
        for flag, what in modes:
            r = load_seconds(bundle, repo, flag, stamps)
            if "error" in r:
                print(f"| {tree}, {what} | error: {r['error']} | | |")
                continue
            print(f"| {tree}, {what} | {r['gb']:.2f} | {r['wall_s'] / r['gb']:.2f} | {r['cpu_s'] / r['gb']:.2f} |")
    print(f"load average after: {os.getloadavg()}")
    (work / "compile_cost.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
