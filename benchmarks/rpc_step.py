"""Decode steps of one bundle driven over TVM RPC: weights held on the device (resident entries) vs passed each call.

Starts a stock tracker and a native ``tvm.exec.rpc_server`` on loopback, then times ``--steps`` greedy decode
steps (after the prompt) three ways, each in its own RPC session: a local session (no RPC), a remote session
calling the bundle's ``decode_resident`` (weights and KV caches held in the device's tensor cache, a step sends
a token and a position), and a remote session passing every weight and cache to ``decode`` through
``set_input``, as sessions did before the resident entries (and still do for bundles compiled without them),
which the device copies on every call. Prints ms a step (median; ``step`` returns the logits), ms a
decode step of a greedy ``generate`` (over RPC with resident entries the device returns only the next
token), the ratio, the served process's peak RSS (``VmHWM``: the copies are resident memory too) and whether
the greedy tokens agree; then what each RPC call of a resident step costs, and what the resident entry's
tensor-cache lookup and greedy token cost in a local call.

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
import tvm

from moec.artifact.resident_keys import SUFFIX, cache_key, param_key

from moec.hardware.loopback import start_rpc_server, start_tracker
from moec.runtime.tensor_holder import TensorHolder
from moec.runtime.session import BundleSession, open_remote_bundle


def _generate_ms(sess: BundleSession, prompt: list[int], n: int) -> float:
    """ms a decode step of ``generate`` (greedy: over RPC with resident entries, only the token comes back)."""
    _, stats = sess.generate(prompt, n)
    return 1e3 / stats.decode_tokens_per_s


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


def _median_ms(fn, n: int = 50) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _rpc_calls(sess: BundleSession) -> dict[str, float]:
    """ms of each RPC call a resident decode step makes (the session's own input tensors)."""
    sess.step(1)
    tok, pos = sess._sent[("decode", 1)]
    vm, name = sess.vm, "decode" + SUFFIX
    out = vm.get_outputs(name)
    logits = out[0]
    return {"token copy": _median_ms(lambda: tok.copyfrom(np.array([1], np.int32))),
            "position copy": _median_ms(lambda: pos.copyfrom(np.array([0], np.int64))),
            "set_input": _median_ms(lambda: vm.set_input(name, tok, pos)),
            "invoke_stateful": _median_ms(lambda: vm.invoke_stateful(name)),
            "get_outputs": _median_ms(lambda: vm.get_outputs(name)),
            "logits to host": _median_ms(lambda: logits.numpy())}


def _lookup_cost(bundle: str) -> tuple[float, float, int]:
    """Local ms of ``decode`` with the tensors as arguments and of ``decode_resident`` (one thread)."""
    with BundleSession(bundle, threads=1) as s:
        update = tvm.get_global_func("vm.builtin.tensor_cache.update")
        for key, tensors in ((param_key, s.params), (cache_key, s.cache)):
            for i, t in enumerate(tensors):
                update(key(i), t, True)
        tok, pos = tvm.runtime.tensor(np.array([1], np.int32)), tvm.runtime.tensor(np.array([0], np.int64))
        f, g = s.vm["decode"], s.vm["decode" + SUFFIX]
        for _ in range(20):
            f(tok, pos, *s.cache, *s.params), g(tok, pos)
        out = (_median_ms(lambda: f(tok, pos, *s.cache, *s.params), 400), _median_ms(lambda: g(tok, pos), 400),
               len(s.params) + len(s.cache))
        tvm.get_global_func("vm.builtin.tensor_cache.clear")()
        return out


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
        rows.append(("local (no RPC)", ids, times, None, _generate_ms(local, prompt, args.steps)))
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
                            rows.append((label, ids, times, _served_peak_mb(server),
                                         _generate_ms(sess, prompt, args.steps)))
                            if resident:
                                calls = _rpc_calls(sess)
                    finally:
                        TensorHolder.on = holder_on
    base = statistics.median(rows[1][2])
    print(f"bundle {args.bundle}, {args.steps} decode steps after a {len(prompt)}-token prompt")
    print("| session | ms/step (median) | vs resident | generate ms/token | served peak RSS MB | tokens = local |")
    print("|---|---|---|---|---|---|")
    for label, ids, times, rss, gen in rows:
        med = statistics.median(times)
        print(f"| {label} | {med * 1e3:.2f} | {med / base:.2f}x | {gen:.2f} | {'' if rss is None else f'{rss:.0f}'} "
              f"| {'yes' if ids == rows[0][1] else 'NO'} |")
    print("\nRPC calls of a resident decode step (ms, median of 50):")
    print(" | ".join(f"{k} {v:.3f}" for k, v in calls.items()))
    plain, resident, tensors = _lookup_cost(args.bundle)
    print(f"local decode {plain * 1e3:.1f} us, decode{SUFFIX} {resident * 1e3:.1f} us (one thread): the "
          f"tensor-cache lookup of {tensors} tensors costs {(resident - plain) * 1e3 / tensors:.2f} us a tensor")


if __name__ == "__main__":
    main()
