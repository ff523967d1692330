"""Prefill speed of moec bundles: build the OLMoE-shaped or reference bundles, then time ``prefill`` interleaved.

Usage::

    # build (random OLMoE-shaped weights: hidden 2048, 64 experts × 1024, top-8, 4 layers; or a checkpoint)
    python benchmarks/prefill_speed.py build OUT --model olmoe --bits 4 --activations int8
    python benchmarks/prefill_speed.py build OUT --model reference/checkpoint --bits 4 --activations int8
    # time one or more bundles, interleaved rounds, medians (tok/s = prompt tokens / prefill seconds)
    python benchmarks/prefill_speed.py time BUNDLE [BUNDLE ...] --tokens 64,512 --rounds 3
    # where a prefill's time goes: the same call under TVM's VM profiler (per-kernel totals)
    python benchmarks/prefill_speed.py profile BUNDLE --tokens 64
    # per kernel, free of the hook's cost: each kernel call re-run alone on its own arguments (warm, CPU time)
    python benchmarks/prefill_speed.py kernels BUNDLE --tokens 64 --top 30

Bundles built by one version of moec can be timed by another (a bundle carries its own library),
so before/after comparisons time both in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

import numpy as np


def olmoe_config():
    from moec.core.config import MoEConfig
    return MoEConfig(vocab_size=4096, hidden_size=2048, num_layers=4, num_heads=16, num_kv_heads=16,
                     num_experts=64, top_k=8, expert_intermediate=1024, norm_topk_prob=False)


def build(out: str, model: str, bits: int, activations: str, group: int) -> None:
    from moec.core.plan import uniform_plan
    from moec.core.targets import load_target
    from moec.lower.bundler import build_bundle_from_params
    from moec.lower.params import build_params
    from moec.quant.weights import ModelWeights, random_weights
    if model == "olmoe":
        cfg = olmoe_config()
        plan = uniform_plan(cfg, bits, group)
        weights = random_weights(cfg, plan)
    else:
        from moec.models.checkpoint import load_checkpoint
        m = load_checkpoint(model)
        cfg = m.cfg
        plan = uniform_plan(cfg, bits, group)
        weights = ModelWeights.from_model(m, plan)
    t0 = time.time()
    params = build_params(cfg, plan, weights.packed, weights.floats)
    build_bundle_from_params(cfg, plan, params, load_target("host"), out, None, activations=activations,
                             force=True)
    print(f"built {out} in {time.time() - t0:.0f} s")


def _prompt(n: int) -> list[int]:
    return [3 + i % 97 for i in range(n)]


def time_bundles(bundles: list[str], tokens: list[int], rounds: int, repeats: int) -> None:
    from moec.runtime.session import BundleSession
    sessions = {b: BundleSession(b) for b in bundles}
    rates: dict[tuple[str, int], list[float]] = {(b, n): [] for b in bundles for n in tokens}
    for s in sessions.values():  # warm up (first call allocates)
        s.reset()
        s.prefill(_prompt(8))
    for _ in range(rounds):
        for n in tokens:
            for b, s in sessions.items():
                times = []
                for _ in range(repeats):
                    s.reset()
                    t0 = time.perf_counter()
                    s.prefill(_prompt(n))
                    times.append(time.perf_counter() - t0)
                rates[(b, n)].append(n / min(times))
    print(f"load average {os.getloadavg()[0]:.2f}; {rounds} interleaved rounds, best of {repeats} per round, "
          f"median over rounds")
    print("| bundle | prompt tokens | prefill tok/s (median) | per round |")
    print("|---|---|---|---|")
    for (b, n), r in rates.items():
        print(f"| {Path(b).name} | {n} | {statistics.median(r):.1f} | {' / '.join(f'{x:.1f}' for x in r)} |")


def profile(bundle: str, n: int, top: int = 0) -> None:
    """Time of each VM call of one prefill (an instrument around every call), grouped by kind;
    the rest of the wall time is the VM's own dispatch (and Python)."""
    import tvm
    from moec.runtime.session import BundleSession
    s = BundleSession(bundle)
    calls: list[tuple[str, float]] = []
    started: list[float] = []

    def instrument(func, symbol, before, ret, *args):
        if before:
            started.append(time.perf_counter())
        else:
            calls.append((str(symbol), time.perf_counter() - started.pop()))
        return 0

    s.reset()
    s.prefill(_prompt(n))  # warm
    s.vm.set_instrument(instrument)
    walls = []
    for _ in range(3):
        calls.clear()
        s.reset()
        t0 = time.perf_counter()
        s.prefill(_prompt(n))
        walls.append(time.perf_counter() - t0)
    wall = walls[-1]
    rows: dict[str, float] = {}
    for name, sec in calls:
        rows[_kind(name)] = rows.get(_kind(name), 0.0) + sec
    total = sum(rows.values())
    print(f"prefill of {n} tokens, load average {os.getloadavg()[0]:.2f}: {wall * 1e3:.1f} ms wall "
          f"(instrumented), {total * 1e3:.1f} ms in {len(calls)} calls")
    print("| part | ms | share of wall |")
    print("|---|---|---|")
    for kind, sec in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {sec * 1e3:.1f} | {100 * sec / wall:.0f} % |")
    print(f"| VM dispatch, Python | {(wall - total) * 1e3:.1f} | {100 * (wall - total) / wall:.0f} % |")
    if top:
        per_name: dict[str, float] = {}
        for name, sec in calls:
            base = name.rstrip("0123456789_")
            per_name[base] = per_name.get(base, 0.0) + sec
        print("\n| function (layers summed) | ms |\n|---|---|")
        for name, sec in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]:
            print(f"| {name} | {sec * 1e3:.1f} |")


def kernel_times(bundle: str, n: int, top: int, repeats: int = 20) -> None:
    """Each kernel call of one prefill re-run ``repeats`` times at the moment the VM calls it (its arguments
    are then valid: later calls reuse the buffers), timed in this thread's CPU time on one thread."""
    from moec.runtime.session import BundleSession
    s = BundleSession(bundle, threads=1)
    s.reset()
    s.prefill(_prompt(n))
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    builtins = [0]

    def hook(func, sym, before, ret, *args):
        sym = str(sym)
        if not before:
            return 0
        if sym.startswith("vm."):
            builtins[0] += 1
            return 0
        for _ in range(3):
            func(*args)
        t0 = time.thread_time()
        for _ in range(repeats):
            func(*args)
        total[sym] = total.get(sym, 0.0) + (time.thread_time() - t0) / repeats
        count[sym] = count.get(sym, 0) + 1
        return 0

    s.reset()
    s.vm.set_instrument(hook)
    s.prefill(_prompt(n))
    plain = BundleSession(bundle, threads=1)  # no hook: the whole prefill's own CPU time
    plain.reset()
    plain.prefill(_prompt(n))
    walls = []
    for _ in range(5):
        plain.reset()
        t0 = time.thread_time()
        plain.prefill(_prompt(n))
        walls.append(time.thread_time() - t0)
    kinds: dict[str, float] = {}
    for sym, sec in total.items():
        kinds[_kind(sym)] = kinds.get(_kind(sym), 0.0) + sec
    ksum = sum(total.values())
    wall = min(walls)
    print(f"prefill of {n} tokens, load average {os.getloadavg()[0]:.2f}, one thread: {wall * 1e3:.2f} ms CPU "
          f"(best of 5, no hook); {sum(count.values())} kernel calls ({len(total)} distinct) sum "
          f"{ksum * 1e3:.2f} ms each alone, warm; {builtins[0]} VM builtins")
    print("| part | ms | share of prefill |\n|---|---|---|")
    for kind, sec in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {sec * 1e3:.2f} | {100 * sec / wall:.0f} % |")
    print(f"| VM builtins, dispatch, Python (the rest) | {(wall - ksum) * 1e3:.2f} | {100 * (wall - ksum) / wall:.0f} % |")
    print("\n| kernel | calls | ms |\n|---|---|---|")
    for sym, sec in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {sym} | {count[sym]} | {sec * 1e3:.3f} |")


def _kind(name: str) -> str:
    if "vm.builtin" in name or name.startswith("vm."):
        return "VM builtins (alloc, shape checks)"
    stack = re.search(r"^gemm_.*_s(\d+)", name)  # kernel symbols name their stack size (_s64)
    if ("experts" in name and "gemm" in name) or (stack and int(stack.group(1)) > 1):
        return "expert grouped GEMMs"
    if "gemm" in name or "gemv" in name:
        return "dense projections (attention, router, lm head)"
    for key, kind in (("argsort", "routing: sort / scatter"), ("take", "routing: gather"),
                      ("causal", "attention (scores, values)"), ("softmax", "attention (scores, values)"),
                      ("topk", "routing: top-k"), ("concat", "KV cache concat")):
        if key in name:
            return kind
    return "other ops (norms, rope, glu, adds)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out")
    b.add_argument("--model", default="olmoe", help="'olmoe' (random OLMoE-shaped weights) or a checkpoint dir")
    b.add_argument("--bits", type=int, default=4)
    b.add_argument("--group-size", type=int, default=64)
    b.add_argument("--activations", choices=["float32", "int8"], default="int8")
    t = sub.add_parser("time")
    t.add_argument("bundles", nargs="+")
    t.add_argument("--tokens", default="64,512")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--repeats", type=int, default=2)
    p = sub.add_parser("profile")
    p.add_argument("bundle")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=0, help="Also list the N most expensive functions.")
    k = sub.add_parser("kernels")
    k.add_argument("bundle")
    k.add_argument("--tokens", type=int, default=64)
    k.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.out, args.model, args.bits, args.activations, args.group_size)
    elif args.cmd == "time":
        time_bundles(args.bundles, [int(x) for x in args.tokens.split(",")], args.rounds, args.repeats)
    elif args.cmd == "kernels":
        kernel_times(args.bundle, args.tokens, args.top)
    else:
        profile(args.bundle, args.tokens, args.top)


if __name__ == "__main__":
    main()
