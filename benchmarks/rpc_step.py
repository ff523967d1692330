"""Decode steps of one bundle driven over TVM RPC: weights held on the device (resident entries) vs passed each call.

Starts a stock tracker and a native ``tvm.exec.rpc_server`` on loopback, then times ``--steps`` greedy decode
steps (after the prompt) three ways, each in its own RPC session: a local session (no RPC), a remote session
calling the bundle's ``decode_resident`` (weights and KV caches held in the device's tensor cache, a step sends
a token and a position), and a remote session passing every weight and cache to ``decode`` through
``set_input``, as sessions did before the resident entries (and still do for bundles compiled without them),
which the device copies on every call. Prints ms a step (median), the ratio, the served process's peak
RSS (``VmHWM``: the copies are resident memory too) and whether the greedy tokens agree.

Usage::

    python benchmarks/rpc_step.py BUNDLE [--steps 32] [--prompt "..."]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from moec.hardware.loopback import start_rpc_server, start_tracker
from moec.runtime.tensor_holder import TensorHolder
from moec.runtime.session import BundleSession, open_remote_bundle


def _steps(sess: BundleSession, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    sess.reset()
    logits = sess.prefill(prompt) if sess.has_prefill else [sess.step(t) for t in prompt][-1]
    ids, times = [], []
    for _ in range(n):
        ids.append(int(np.argmax(logits)))
        t0 = time.perf_counter()
        logits = sess.step(ids[-1])
        times.append(time.perf_counter() - t0)
    return ids, times


def _served_peak_mb(server) -> float:
    """Largest peak RSS among the server's processes (the session is served by a child)."""
    procs = [psutil.Process(server.pid)] + psutil.Process(server.pid).children(recursive=True)
    peak = 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    return peak / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", default="The list type is")
    args = ap.parse_args()
    rows = []
    with BundleSession(args.bundle) as local:
        prompt = local.tokenizer.encode(args.prompt).ids if local.tokenizer else [1, 2, 3]
        ids, times = _steps(local, prompt, args.steps)
        rows.append(("local (no RPC)", ids, times, None))
    holder_on = TensorHolder.on
    with tempfile.TemporaryDirectory(prefix="moec-rpc-step-") as logs:
        tracker, addr = start_tracker(log_dir=Path(logs))
        with tracker:
            for label, resident in (("RPC, resident weights", True), ("RPC, weights passed each call", False)):
                server = start_rpc_server(addr, "rpc-step", timeout=120, log_dir=Path(logs))
                with server:
                    # without the holder a session takes the path of bundles without resident entries
                    TensorHolder.on = holder_on if resident else staticmethod(lambda remote: None)
                    try:
                        with open_remote_bundle(args.bundle, str(addr), "rpc-step", timeout=60) as sess:
                            ids, times = _steps(sess, prompt, args.steps)
                            rows.append((label, ids, times, _served_peak_mb(server)))
                    finally:
                        TensorHolder.on = holder_on
    base = statistics.median(rows[1][2])
    print(f"bundle {args.bundle}, {args.steps} decode steps after a {len(prompt)}-token prompt")
    print("| session | ms/step (median) | vs resident | served peak RSS MB | tokens = local |")
    print("|---|---|---|---|---|")
    for label, ids, times, rss in rows:
        med = statistics.median(times)
        print(f"| {label} | {med * 1e3:.2f} | {med / base:.2f}x | {'' if rss is None else f'{rss:.0f}'} "
              f"| {'yes' if ids == rows[0][1] else 'NO'} |")


if __name__ == "__main__":
    main()
