"""Decode-step CPU time of two or more bundles, interleaved in one process (a loaded machine's drift cancels).

Each round, in turn per bundle: ``reset``, a 16-token prefill, then 64 decode steps (cache 16..80
tokens, the ``peer_llamacpp.py`` decode range), each timed as this thread's CPU time (the whole step
at one TVM thread, which small bundles decode on) and wall clock. The bundles carry their own
libraries, so bundles of two moec versions compare under one runtime. Each bundle after the first
also gets its speed-up over the first: the first's p50 wall step over its own, per round (the
median and range of those) and over all rounds.

Usage::

    python benchmarks/step_ab.py BUNDLE_A BUNDLE_B [--rounds 40]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    from moec.runtime.session import BundleSession

    sessions = [BundleSession(b) for b in args.bundles]
    cpu: dict[str, list[float]] = {b: [] for b in args.bundles}
    wall: dict[str, list[float]] = {b: [] for b in args.bundles}
    rounds: dict[str, list[float]] = {b: [] for b in args.bundles}  # p50 wall step of each round
    print(f"load average before: {os.getloadavg()}")
    for _ in range(args.rounds):
        for b, s in zip(args.bundles, sessions):
            s.reset()
            s.prefill(list(range(3, 19)))
            for i in range(64):
                w0, c0 = time.perf_counter(), time.thread_time()
                s.step(5 + i % 50)
                cpu[b].append(time.thread_time() - c0)
                wall[b].append(time.perf_counter() - w0)
            rounds[b].append(float(np.median(wall[b][-64:])))
    print(f"load average after: {os.getloadavg()}")
    for b in args.bundles:
        c, w = np.array(cpu[b]) * 1e6, np.array(wall[b]) * 1e6
        print(f"{b}: CPU p50 {np.median(c):.1f} us, p90 {np.percentile(c, 90):.1f} us; wall p50 {np.median(w):.1f} us, "
              f"p99 {np.percentile(w, 99):.1f} us ({1e6 / np.median(w):.0f} tok/s at the p50 step)")
    first = args.bundles[0]
    for b in args.bundles[1:]:
        per = np.array(rounds[first]) / np.array(rounds[b])
        print(f"{b} vs {first}: {np.median(wall[first]) / np.median(wall[b]):.2f}x at the p50 step; per round "
              f"median {np.median(per):.2f}x, range {per.min():.2f}-{per.max():.2f}x ({len(per)} rounds)")


if __name__ == "__main__":
    main()
