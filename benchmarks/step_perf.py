"""Where a decode step's CPU time goes, by ``perf record`` samples: each kernel, the TVM runtime, the OS.

``step_profile.py`` times kernels with the Relax VM's instrument hook; with TVM's 2-thread pool that
is misleading: the hook's Python callback runs between every two kernels, the pool's worker waits
through it, and "step minus the sum of kernels" (called VM work there) also holds the time each
kernel's threads wait for each other. This samples a child process that steps the bundle with no hook,
at the session's own thread count, over every thread of the process:

- each compiled kernel of the bundle (``lib.so``; the session loads a temporary copy that is deleted,
  so its sampled addresses are named with ``nm`` on the bundle's own ``lib.so``);
- ``TVM runtime`` (``libtvm_runtime``, ``libtvm_ffi``: the VM, its builtins, the thread pool's
  spinning); ``OS`` (``[kernel.kallsyms]``: mostly ``sched_yield`` of a pool thread waiting for the
  other one to finish its share, and preemption by other processes); ``libc``; ``Python``; other.

Each share is also given as CPU ms per step (share x the process's CPU time per step, all threads,
``getrusage``), beside the wall time and the calling thread's CPU time per step. The child loops
decode steps after a 16-token prompt (the cache is reset when it nears the session's capacity) and
is sampled for ``--seconds`` after ``--warmup`` steps. Needs ``perf`` and permission to sample the
child (``perf_event_paranoid`` <= 2 for one's own processes).

Usage::

    python benchmarks/step_perf.py BUNDLE [--threads 2] [--seconds 5] [--warmup 30] [--top 12]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, resource, sys, time
from moec.runtime.session import BundleSession
s = BundleSession(sys.argv[1], threads=None if sys.argv[2] == "auto" else int(sys.argv[2]))
prompt = list(range(3, 19))
s.prefill(prompt)
def step(i):
    if s.pos >= min(s.capacity, 16 + 200) - 1:  # keep the cache length in 16..216 tokens
        s.reset(); s.prefill(prompt)
    s.step(5 + i % 50)
for i in range(int(sys.argv[3])):
    step(i)
cpu = lambda: sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
print("READY", flush=True)
sys.stdin.readline()  # sampling starts
n, t0, c0, m0 = 0, time.perf_counter(), cpu(), time.thread_time()
import select
while not select.select([sys.stdin], [], [], 0)[0]:
    step(n); n += 1
print(json.dumps({"steps": n, "threads": s.threads, "wall_ms": (time.perf_counter() - t0) * 1e3 / n,
                  "cpu_ms": (cpu() - c0) * 1e3 / n, "main_cpu_ms": (time.thread_time() - m0) * 1e3 / n}), flush=True)
'''

_LINE = re.compile(r"^\s*([\d.]+)%\s+(.+?)\s+\[(.)\]\s+(\S+)")


def kernel_symbols(lib: Path) -> tuple[list[int], list[str]]:
    """Sorted start addresses and names of the text symbols of ``lib`` (``nm -n``)."""
    out = subprocess.run(["nm", "-n", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    addrs, names = [], []
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[1] in "tT":
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    return addrs, names


def kernel_name(symbol: str) -> str:
    """A kernel's name from one of its symbols (TVM's ``__tvm_ffi_`` wrapper, its ``_compute_`` body)."""
    name = symbol.removeprefix("__tvm_ffi_")
    return name[:-len("_compute_")] if name.endswith("_compute_") else name


def attribute(report: str, addrs: list[int], names: list[str]) -> collections.Counter:
    """Percent of samples per bucket from ``perf report --sort dso,sym -g none --stdio`` text.

    Samples in the bundle's ``lib.so`` go to the kernel whose symbol holds the address (perf prints
    an unresolved address when the mapped file was deleted, or a symbol name when it was not)."""
    shares: collections.Counter = collections.Counter()
    for line in report.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2).removesuffix(" (deleted)"), m.group(4)
        if dso == "lib.so":
            if sym.startswith("0x"):
                i = bisect.bisect_right(addrs, int(sym, 16)) - 1
                sym = names[i] if i >= 0 else "?"
            shares[kernel_name(sym)] += pct
        elif dso.startswith("libtvm"):
            shares["TVM runtime"] += pct
        elif dso == "[kernel.kallsyms]":
            shares["OS"] += pct
        elif dso.startswith("libc.so") or dso.startswith("libm.so"):
            shares["libc"] += pct
        elif dso.startswith("libpython") or dso == "python3.11":
            shares["Python"] += pct
        else:
            shares["other"] += pct
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--threads", default="auto", help="TVM threads (default: the session's choice)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    bundle = Path(args.bundle)
    addrs, names = kernel_symbols(bundle / "lib.so")
    print(f"load average before: {os.getloadavg()}")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(bundle), args.threads, str(args.warmup)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "READY":
            raise SystemExit("the decode child failed before sampling")
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "perf.data"
            rec = subprocess.Popen(["perf", "record", "-q", "-p", str(child.pid), "-o", str(data),
                                    "--", "sleep", str(args.seconds)], stderr=subprocess.PIPE, text=True)
            child.stdin.write("go\n")
            child.stdin.flush()
            rec.wait()
            child.stdin.write("stop\n")
            child.stdin.flush()
            stats = json.loads(child.stdout.readline())
            if rec.returncode:
                raise SystemExit(f"perf record failed: {rec.stderr.read().strip()[-300:]}")
            report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym",
                                     "-g", "none", "--stdio"], capture_output=True, text=True, check=True).stdout
    finally:
        child.kill()
        child.wait()
    shares = attribute(report, addrs, names)
    total = sum(shares.values()) or 1.0
    print(f"threads {stats['threads']}, {stats['steps']} steps sampled (cache 16..216 tokens): wall "
          f"{stats['wall_ms']:.2f} ms/step, process CPU {stats['cpu_ms']:.2f} ms/step (all threads), "
          f"calling thread CPU {stats['main_cpu_ms']:.2f} ms/step")
    groups = {"TVM runtime", "OS", "libc", "Python", "other"}
    kernels = {k: v for k, v in shares.items() if k not in groups}
    print(f"compiled kernels {sum(kernels.values()) / total * 100:5.1f} % "
          f"({sum(kernels.values()) / total * stats['cpu_ms']:.2f} CPU ms/step)")
    for k in sorted(groups, key=lambda g: -shares[g]):
        print(f"{k:16s} {shares[k] / total * 100:5.1f} % ({shares[k] / total * stats['cpu_ms']:.2f} CPU ms/step)")
    print("kernels:")
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {v / total * 100:5.1f} %  {v / total * stats['cpu_ms']:6.2f} CPU ms/step  {k}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
