"""Reference model on the emulated arm64 device: aarch64 bundles vs the host bundle, through the stock tracker.

Compiles CHECKPOINT for ``host`` and each ARM preset under one plan, starts the emulated device
(``tools/arm64_emu.py``; set up first if needed) with its own tracker on loopback, runs greedy
generation there, and checks the token ids equal the host bundle's and the logits are close.
Prints set-up / registration times and decode tokens/s. Tokens/s under qemu emulation say
nothing about real ARM speed (emulated code runs several times slower than native).

Usage::

    python benchmarks/emulated_arm64.py reference/checkpoint --presets aarch64-generic,raspberry-pi-5 \
        --plan uniform:4 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from moec import api
from moec.hardware.emulated import start_device
from moec.runtime.session import open_remote_bundle
from moec.runtime.session import BundleSession


def trace(sess: BundleSession, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray], float]:
    """Greedy ids, every step's logits, and decode steps per second."""
    sess.reset()
    logits = [sess.step(t) for t in prompt]
    ids: list[int] = []
    t0 = time.perf_counter()
    while len(ids) < n:
        ids.append(int(np.argmax(logits[-1])))
        if len(ids) < n:
            logits.append(sess.step(ids[-1]))
    return ids, logits, (n - 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--presets", default="aarch64-generic,raspberry-pi-5")
    ap.add_argument("--plan", default="uniform:4")
    ap.add_argument("--prompt", default="The list type is")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="Keep the bundles here (default: a temporary folder).")
    ap.add_argument("--json", default=None, help="Write the results as JSON here.")
    args = ap.parse_args()
    presets = args.presets.split(",")
    results: dict = {"plan": args.plan, "tokens": args.tokens, "note": "tokens/s under qemu emulation"}

    with tempfile.TemporaryDirectory(prefix="moec-emu-bench-") as tmp:
        root = Path(args.out or tmp)
        bundles = {}
        for target in ("host", *presets):
            t0 = time.time()
            bundles[target] = api.compile_bundle(api.CompileConfig(args.checkpoint, root / target, target, args.plan))
            print(f"compiled {target:<18} {time.time() - t0:6.1f} s")
        host = BundleSession(bundles["host"])
        prompt = host.tokenizer.encode(args.prompt).ids
        want_ids, want_logits, host_tps = trace(host, prompt, args.tokens)
        results["host_tokens_per_s"] = round(host_tps, 1)

        steps: dict[str, float] = {}
        t0 = time.time()
        with start_device(on_step=lambda name, s: steps.__setitem__(name, round(s, 1))) as run:
            results["device_start_seconds"] = round(time.time() - t0, 1)
            results["steps"] = steps
            for preset in presets:
                t1 = time.time()
                with open_remote_bundle(bundles[preset], str(run.tracker_address), run.key, timeout=120) as sess:
                    load = time.time() - t1
                    ids, logits, tps = trace(sess, prompt, args.tokens)
                err = max(float(np.max(np.abs(a - b))) for a, b in zip(logits, want_logits))
                results[preset] = {"ids_equal": ids == want_ids, "max_abs_logit_diff": err,
                                   "load_seconds": round(load, 1), "emulated_tokens_per_s": round(tps, 1)}
                print(f"{preset:<18} ids equal host: {ids == want_ids}; max |logit diff| {err:.2e}; "
                      f"upload+load {load:.1f} s; {tps:.1f} tokens/s (emulated)")
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
