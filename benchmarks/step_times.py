"""Decode step-time distribution (p50/p90/p99) of a bundle at given TVM thread counts, interleaved round by round.

Each round starts a fresh process per thread count (the TVM pool is process-wide), feeds a
16-token prompt and times ``--steps`` decode steps (wall clock, and the calling thread's CPU
time: with one TVM thread that is the step's own work, which a loaded machine does not inflate
by preempting it, and the calling thread's minor page faults, ``getrusage(RUSAGE_THREAD)``).
Each round also times the machine's own floor: a fixed in-cache numpy computation (one thread)
calibrated to the bundle's median step, the same number of times, in a fresh process; its p99/p50
is the step-time spread this machine shows for work that does not vary at all.
A decode step's attention grows with the context, so over one run of ``--steps`` steps the step
time rises by itself (on the reference model the attention is ~40 % of a step at 166 tokens);
``--window W`` times every step within a context of 16..16+W tokens (the session is reset to the
prompt every W steps, untimed), which leaves the spread of equal work: the jitter.
``--threads 2`` reproduces the pool that small bundles used before they were given one thread.
The child uses only ``BundleSession(bundle, threads)``, ``prefill`` and ``step``, so running this
script with another checkout on ``PYTHONPATH`` times that checkout's runtime.

Usage::

    python benchmarks/step_times.py BUNDLE [--threads 1,2] [--rounds 4] [--steps 300] [--window 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

CHILD = r'''
import json, resource, sys, time
from moec.runtime.session import BundleSession
s = BundleSession(sys.argv[1], threads=int(sys.argv[2]))
prompt = list(range(3, 19))
s.prefill(prompt)
ts, cpu, faults = [], [], []
usage = lambda: resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
window = int(sys.argv[4])
for i in range(int(sys.argv[3])):
    if window and i and i % window == 0:  # back to the same 16-token context (not timed)
        s.reset(); s.prefill(prompt)
    f0, t0, c0 = usage(), time.perf_counter(), time.thread_time(); s.step(5 + i % 50)
    ts.append(time.perf_counter() - t0); cpu.append(time.thread_time() - c0); faults.append(usage() - f0)
print(json.dumps([ts, cpu, faults]))
'''

FLOOR = r'''
import json, sys, time
import numpy as np
a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32) * 0.1
def work(n):
    x = a
    for _ in range(n):
        x = np.tanh(x @ a)
    return x
one = np.median([(lambda t0: (work(8), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(300)]) / 8
n = max(1, round(float(sys.argv[1]) / 1e3 / one))
ts, cpu = [], []
for _ in range(int(sys.argv[2])):
    t0, c0 = time.perf_counter(), time.thread_time(); work(n)
    ts.append(time.perf_counter() - t0); cpu.append(time.thread_time() - c0)
print(json.dumps([ts, cpu]))
'''
FLOOR_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def summary(ms: np.ndarray) -> str:
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return (f"p50 {p50:.3f} p90 {p90:.3f} p99 {p99:.3f} ms, p99/p50 {p99 / p50:.2f}, "
            f"{1e3 / ms.mean():.0f} tok/s (mean step), {1e3 / p50:.0f} tok/s (p50 step)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--window", type=int, default=0,
                    help="reset to the 16-token prompt every WINDOW steps, so every timed step sees a context "
                         "of 16..16+WINDOW tokens (0: one run, the context growing by a token a step)")
    args = ap.parse_args()
    if args.window < 0:
        ap.error(f"--window {args.window} is negative")
    counts = [int(t) for t in args.threads.split(",")]
    print(f"load average before: {os.getloadavg()}", flush=True)
    res: dict[int, list[np.ndarray]] = {t: [] for t in counts}
    cpu: dict[int, list[np.ndarray]] = {t: [] for t in counts}
    faults: dict[int, list[np.ndarray]] = {t: [] for t in counts}
    floor: list[np.ndarray] = []
    for r in range(args.rounds):
        for t in counts:
            out = subprocess.run([sys.executable, "-c", CHILD, args.bundle, str(t), str(args.steps), str(args.window)],
                                 check=True, capture_output=True, text=True).stdout
            wall, used, flt = json.loads(out.strip().splitlines()[-1])
            wall, used = np.array(wall) * 1e3, np.array(used) * 1e3
            res[t].append(wall)
            cpu[t].append(used)
            faults[t].append(np.array(flt, float))
            print(f"round {r} threads={t}: {summary(wall)}; CPU p50 {np.median(used):.3f} p99 "
                  f"{np.percentile(used, 99):.3f} ms; minor faults per step mean {np.mean(flt):.2f}", flush=True)
        target = np.median(np.concatenate([res[t][-1] for t in counts]))
        out = subprocess.run([sys.executable, "-c", FLOOR, str(target), str(args.steps)], check=True,
                             capture_output=True, text=True, env={**os.environ, **FLOOR_ENV}).stdout
        wall = np.array(json.loads(out.strip().splitlines()[-1])[0]) * 1e3
        floor.append(wall)
        print(f"round {r} machine floor (fixed numpy work of the median step): {summary(wall)}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    for t in counts:
        print(f"all rounds threads={t}: {summary(np.concatenate(res[t]))}")
    print(f"all rounds machine floor: {summary(np.concatenate(floor))}")
    for t in counts:  # on one thread the step's CPU time is its work without the scheduler's preemptions
        used, flt = np.concatenate(cpu[t]), np.concatenate(faults[t])
        p50, p99 = np.percentile(used, [50, 99])
        print(f"all rounds threads={t} CPU time of the calling thread: p50 {p50:.3f} p99 {p99:.3f} ms "
              f"(p99/p50 {p99 / p50:.2f}); minor page faults per step: mean {flt.mean():.2f}, "
              f"steps with any {np.mean(flt > 0) * 100:.1f} %")


if __name__ == "__main__":
    main()
