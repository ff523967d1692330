"""Where one decode step of a bundle goes: VM instructions per step, kernel vs builtin time, Python around the call.

Three measurements in one process (``--threads``, default the session's choice):

1. ``step``: ``BundleSession.step`` timed ``--steps`` times (p50 of this thread's CPU time, so a
   loaded machine's preemptions drop out), then the bare VM call with the same arguments (the
   difference is the Python in ``step``: token input, output unpacking, logits).
2. VM instructions per step, counted with the Relax VM's instrument hook: every ``call`` the
   step makes, builtins (``vm.builtin.*``: allocation, shape checks, tuples) and compiled kernels
   apart.
3. Per kernel, the median time between the hook's before and after callbacks over the steps
   less the hook's own cost per call (hooked minus plain step CPU time, over the calls; a rough
   estimate: the per-kernel figures are indicative, compare them with each other); the step
   minus that sum is what the VM spends between kernels. On TVM's pool (``--threads`` > 1) the
   hook's Python callback between kernels and the unstable estimate of its cost make that split
   unreliable (it came out negative on the OLMoE-shaped bundles): ``step_perf.py`` samples the
   step without a hook.

Usage::

    python benchmarks/step_profile.py BUNDLE [--steps 200] [--threads 1] [--top 25] [--plan uniform:3]

``--plan`` (a nested bundle) serves that run-time plan (``BundleSession.set_plan``: a plan JSON or
``uniform:B``) before anything is timed.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--plan", default=None, help="a nested bundle's run-time plan (JSON or uniform:B)")
    args = ap.parse_args()
    import tvm

    from moec.runtime.session import BundleSession

    print(f"load average before: {os.getloadavg()}")
    s = BundleSession(args.bundle, threads=args.threads)
    if args.plan:
        s.set_plan(args.plan)
    s.prefill(list(range(3, 19)))

    def timed(fn, n, clock=time.perf_counter):
        ts = []
        for i in range(n):
            t0 = clock()
            fn(i)
            ts.append(clock() - t0)
        return np.array(ts) * 1e6

    # on one TVM thread the step runs on this thread: its CPU time is the step without preemption
    cpu = timed(lambda i: s.step(5 + i % 50), args.steps, time.thread_time)
    fn = s.vm["decode"]
    inp = tvm.runtime.tensor(np.array([5], np.int32), s.dev)
    pos = tvm.runtime.tensor(np.array([s.pos], np.int64), s.dev)  # every bare call rewrites this row
    bare = timed(lambda i: fn(inp, pos, *s.cache, *s.params), args.steps, time.thread_time)

    counts: collections.Counter = collections.Counter()
    spans: dict[str, list[float]] = collections.defaultdict(list)
    started: dict[str, float] = {}

    def instrument(func, sym, before, ret, *a):
        now = time.perf_counter()
        if before:
            started[sym] = now
        else:
            counts[sym] += 1
            spans[sym].append(now - started[sym])
        return 0

    s.vm.set_instrument(instrument)
    n = args.steps
    hooked = timed(lambda i: s.step(5 + i % 50), n, time.thread_time)  # cache 16 + n .. 16 + 2n

    builtin = {k: v for k, v in counts.items() if k.startswith("vm.builtin.")}
    kernels = {k: v for k, v in counts.items() if not k.startswith("vm.builtin.")}
    # the hook's own cost per VM call: what the hooked steps took beyond plain ones, spread over the
    # calls (the Python callbacks dominate it); each kernel's span holds about one such share
    calls = sum(counts.values()) / n
    hook = max(0.0, (np.median(hooked) - np.median(cpu)) * 1e-6 / calls)
    kernel_us = {k: max(0.0, float(np.median(spans[k])) - hook) * 1e6 * counts[k] / n for k in kernels}
    print(f"threads {s.threads}; CPU time of this thread (the whole step when threads == 1), cache 16..{16 + n} "
          f"tokens: BundleSession.step p50 {np.median(cpu):.1f} us, bare VM call p50 {np.median(bare):.1f} us "
          f"-> Python around the call ~{np.median(cpu) - np.median(bare):.1f} us")
    print(f"VM calls per step: {sum(counts.values()) / n:.0f} = {sum(kernels.values()) / n:.0f} kernel calls "
          f"({len(kernels)} distinct) + {sum(builtin.values()) / n:.0f} builtins")
    for k, v in sorted(builtin.items(), key=lambda kv: -kv[1]):
        print(f"  {v / n:6.1f} x {k}")
    total = sum(kernel_us.values())
    print(f"kernels: {total:.1f} us per step (sum of per-kernel medians less the hook's "
          f"{hook * 1e6:.1f} us per call, estimated); "
          f"bare step - kernels = {np.median(bare) - total:.1f} us of VM work between kernels")
    for k, us in sorted(kernel_us.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {us:7.1f} us  {counts[k] / n:4.1f} x {k}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
