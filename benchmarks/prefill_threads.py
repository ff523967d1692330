"""Where a prefill gains from TVM's pool: a bundle's prefill at 1 and N threads, fresh processes, per prompt length.

Usage::

    python benchmarks/prefill_threads.py BUNDLE --tokens 8,16,32,64,128,512 --rounds 10 [--threads 2] [--max-load 1.3]

Each round runs one process per thread count (``BundleSession(prefill_threads=...)``; decode on the
session's default): a warm-up prefill of the longest prompt, then per length the best of ``--reps``
prefills on an empty cache, then 64 decode steps right after each of ``--reps`` prefills of the longest
prompt (does a pool prefill slow the decode after it?). A round whose load average (1 min, read
before and after it) passes ``--max-load`` is dropped: two threads on a shared 2-core machine
measure the neighbours. The table gives medians over the kept rounds and the median of the per-round
ratios (N threads / 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
from moec.runtime.session import BundleSession
bundle, threads, lens, reps = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
s = BundleSession(bundle, prefill_threads=threads, trust_verified=True)
prompt = [3 + i % 97 for i in range(max(lens))]
s.prefill(prompt)
for i in range(8):
    s.step(5 + i)
out = {}
for n in lens:
    best = float("inf")
    for _ in range(reps):
        s.reset()
        t0 = time.perf_counter()
        s.prefill(prompt[:n])
        best = min(best, time.perf_counter() - t0)
    out[str(n)] = n / best
steps = []
for _ in range(reps):
    s.reset()
    s.prefill(prompt)
    for i in range(64):
        t0 = time.perf_counter()
        s.step(5 + i % 50)
        steps.append(time.perf_counter() - t0)
out["decode"] = len(steps) / sum(steps)
out["decode_p50"] = 1 / statistics.median(steps)
print(json.dumps(out))
"""


def run_one(bundle: str, threads: int, lens: list[int], reps: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, bundle, str(threads), json.dumps(lens), str(reps)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--tokens", default="8,16,32,64,128,512")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="the pool's count compared with 1")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-load", type=float, default=1.3, help="drop rounds above this 1-minute load average")
    args = ap.parse_args()
    lens = [int(n) for n in args.tokens.split(",")]
    kept, loads = [], []
    for rnd in range(args.rounds):
        before = os.getloadavg()[0]
        one, many = run_one(args.bundle, 1, lens, args.reps), run_one(args.bundle, args.threads, lens, args.reps)
        after = os.getloadavg()[0]
        ok = max(before, after) <= args.max_load
        print(f"round {rnd}: load {before:.2f} -> {after:.2f}{'' if ok else ' (dropped)'}: "
              + ", ".join(f"{n}: {one[str(n)]:.0f} / {many[str(n)]:.0f}" for n in lens)
              + f", decode after: {one['decode']:.0f} / {many['decode']:.0f} tok/s", flush=True)
        if ok:
            kept.append((one, many))
            loads += [before, after]
    if not kept:
        raise SystemExit(f"no round under load {args.max_load}")
    med = statistics.median
    n = args.threads
    print(f"\n{len(kept)} of {args.rounds} rounds kept, load average {min(loads):.2f}-{max(loads):.2f}")
    print(f"| prompt tokens | 1 thread tok/s | {n} threads tok/s | {n} / 1 (median of rounds) | rounds {n} faster |")
    print("|---|---|---|---|---|")
    for key in [str(x) for x in lens] + ["decode", "decode_p50"]:
        name = {"decode": "decode after (mean)", "decode_p50": "decode after (p50)"}.get(key, key)
        ratios = [m[key] / o[key] for o, m in kept]
        print(f"| {name} | {med(o[key] for o, _ in kept):.0f} | {med(m[key] for _, m in kept):.0f} | "
              f"{med(ratios):.2f}x | {sum(r > 1 for r in ratios)}/{len(ratios)} |")


if __name__ == "__main__":
    main()
