"""Per-kernel time of one decode step, each kernel re-run alone on the step's own arguments.

The Relax VM's instrument hook records every kernel call of one step (its function and
arguments); each is then called 200 times in a row and timed in this thread's CPU time (one TVM
thread). Warm figures (weights in L1/L2), free of the hook's per-call cost that ``step_profile.py``
has to estimate: compare kernels and versions with them, not with a whole step.

Usage::

    python benchmarks/kernel_times.py BUNDLE [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    from moec.runtime.session import BundleSession

    s = BundleSession(args.bundle, threads=1)
    s.prefill(list(range(3, 19)))
    for i in range(30):
        s.step(5 + i)
    calls = []

    def hook(func, sym, before, ret, *a):
        if before and not sym.startswith("vm.builtin."):
            calls.append((sym, func, list(a)))
        return 0

    s.vm.set_instrument(hook)
    s.step(7)  # cache of 47 tokens
    total: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for sym, func, a in calls:
        for _ in range(20):
            func(*a)
        t0 = time.thread_time()
        for _ in range(200):
            func(*a)
        total[sym] += (time.thread_time() - t0) / 200 * 1e6
        count[sym] += 1
    print(f"load average {os.getloadavg()[0]:.1f}; {len(calls)} kernel calls per step, {len(total)} distinct, "
          f"sum {sum(total.values()):.1f} us (each alone, warm)")
    for k, v in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{v:8.2f} us {count[k]:3d} x {k}")


if __name__ == "__main__":
    main()
