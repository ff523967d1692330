"""Decode-step CPU time of two or more bundles, interleaved in one process (a loaded machine's drift cancels).

Each round, in turn per bundle: ``reset``, a 16-token prefill, then 64 decode steps (cache 16..80
tokens, the ``peer_llamacpp.py`` decode range), each timed as this thread's CPU time (the whole step
at one TVM thread, which small bundles decode on) and wall clock. The bundles carry their own
libraries, so bundles of two moec versions compare under one runtime.

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
    print(f"load average after: {os.getloadavg()}")
    for b in args.bundles:
        c, w = np.array(cpu[b]) * 1e6, np.array(wall[b]) * 1e6
        print(f"{b}: CPU p50 {np.median(c):.1f} us, p90 {np.percentile(c, 90):.1f} us; wall p50 {np.median(w):.1f} us, "
              f"p99 {np.percentile(w, 99):.1f} us ({1e6 / np.median(w):.0f} tok/s at the p50 step)")


if __name__ == "__main__":
    main()
