"""Dynamic precision at run time (issue 13): one nested bundle serving many plans, next to fixed-plan bundles.

Three parts, each printed as a markdown table:

1. ``kernel``: the routed-expert decode GEMV over a nested 8-bit stack at a run-time width of
   2/3/4/8 bits next to the fixed-width GEMV of that width (same shape: 64 experts × 2048 → 1024
   rows, top-8, stacks far larger than the L2/L3), in effective GB/s of the bytes each reads, per
   activation mode (``--modes float32,int8``: the int8 nested kernel against the fixed int8 one);
   ``--hot``: the same experts every call (in cache).
1b. ``modes``: nested vs fixed decode per activation mode, each timing in a fresh process
   (``dynamic_modes.py``), wall and CPU time.
2. ``decode``: an OLMoE-shaped random model (hidden 2048, 64 experts × 1024, top-8, ``--layers``
   layers; experts ≫ cache). One nested bundle (``--nested 8`` storage) serves every plan via
   ``BundleSession.set_plan``; each plan is also compiled as its own fixed bundle. Decode tok/s,
   the expert MB each plan reads, nested/fixed speed, and the plan-switch latency.
2b. ``prefill``: the same model and plans, prompts of ``--prefill-tokens`` tokens: the nested bundle's
   one-call prefill (nested grouped GEMMs at the plan's run-time widths) vs each plan's fixed bundle's
   prefill vs the nested bundle fed one decode step a token (how it prefilled before it had a
   prefill function).
4. ``latency``: 200 decode steps of the nested OLMoE-shaped bundle under ``--adapt latency``:
   the target starts above the widest plan's step time and is lowered at step 100 to halfway
   between the narrowest and the widest plan's; the table and the plot (``--plot``) show the
   plan (mean expert bits) and the step time following it.
5. ``drift``: domain shift on the reference model. One nested bundle (``--nested 8``, profile on
   ``reference/data/calib.txt``, Python docs) starts at the memory plan of a mid budget chosen
   with the calibration frequencies; decode steps then run over the first half of another
   domain's text, read from an installed Debian file (default
   ``/usr/share/common-licenses/GPL-3``, package ``base-files``; nothing is fetched), with the
   session's drift monitor (``--adapt drift`` policy, windows of ``--drift-window`` tokens). When it fires the
   session re-plans at the same expert bytes; held-out perplexity on the second half is scored
   through the bundle (teacher-forced decode steps) under the calibration-time plan and the
   re-planned one.
3. ``accuracy``: the reference model on its held-out split: each width derived from nested 8-bit
   (and 4-bit) storage of every routed expert vs quantizing every expert directly at that width
   (same method and group size; non-expert weights float), perplexity and top-1; then
   (``--accuracy-rows all|searched``) a searched plan (the nested plan front of the greedy search on a
   proxy-sensitivity profile of ``--calib``, its plan nearest mid-range memory) served nested
   (derived widths) vs fixed (each expert quantized at its width).
3b. ``holdout``: a second family, Qwen2-MoE-shaped with RANDOM weights (no trained checkpoint of
   another family ships): derived vs direct widths scored against the float model's logits
   (relative error, top-1 agreement), not perplexity.

Usage::

    python benchmarks/dynamic.py [--parts kernel,decode,prefill,latency,accuracy,holdout,drift] [--layers 2] [--steps 48]
    python benchmarks/dynamic.py --parts kernel --calls 100 [--cpu-time] [--modes float32,int8] [--hot]
    python benchmarks/dynamic.py --parts modes --rounds 3 [--modes float32,int8] [--plans "uniform 8,uniform 4"]
    python benchmarks/dynamic.py --parts decode --steps 32 --rounds 5 [--cpu-time]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tvm

from moec.core.config import MoEConfig
from moec.core.plan import BitPlan
from moec.core.run_plan import storage_plan
from moec.core.targets import load_target
from moec.lower.bundler import build_bundle_from_params
from moec.core.errors import MoecError
from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv, make_nested_gemv
from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts, to_kernel_layout
from moec.lower.params import build_nested_params, build_params
from moec.lower.schedules import kernel_tile
from moec.models.checkpoint import load_checkpoint
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import file_windows
from moec.profile.evaluate import evaluate_windows
from moec.quant.nested import dequantize_nested, nest
from moec.quant.packed_model import PackedWeight, pack_weight
from moec.quant.weights import random_weights
from moec.runtime.session import BundleSession

WIDTHS = (2, 3, 4, 8)


def expert_plan(cfg: MoEConfig, widths, group: int, name: str) -> BitPlan:
    """Experts at ``widths(layer, expert)``; router float, every other weight 8-bit (the same in every plan)."""
    experts = {l: {e: widths(l, e) for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    return BitPlan(experts, {"router": 16, "re:.*": 8}, group, "rtn", cfg.fingerprint(), {"policy": name})


# -- 1. kernel ----------------------------------------------------------------------------
def _random_packed(bits: int, n: int, k: int, gs: int, rng) -> PackedWeight:
    codes = rng.integers(0, 256, (n, k * bits // 8), dtype=np.uint8)
    zeros = rng.integers(0, 256, (n, -(-(k // gs) * bits // 8)), dtype=np.uint8)
    scale = (rng.random((n, k // gs), dtype=np.float32) * 0.01 + 0.001).astype(np.float16)
    return PackedWeight((n, k), bits, gs, codes, scale, zeros)


def kernel_part(gs: int, calls: int, cpu_time: bool = False, modes: tuple[str, ...] = ("float32",),
                hot: bool = False) -> None:
    """Per activation mode in ``modes``: the nested GEMV at each width vs the fixed kernel of that width and
    mode. ``hot``: the same 8 experts every call (in cache) instead of random routing over the stack."""
    n, k, experts, top_k = 1024, 2048, 64, 8
    target, rng, dev = host_target(), np.random.default_rng(0), tvm.cpu()
    clock = time.thread_time if cpu_time else time.perf_counter
    how = "CPU time of the calling thread, 1 TVM thread" if cpu_time else "wall time"
    routing = "the same 8 experts every call (hot)" if hot else "random routing per call"
    print(f"\n## Routed-expert GEMV: nested 8-bit storage at a run-time width vs the fixed-width kernel "
          f"({experts} experts × [{n}, {k}], top-{top_k}, group {gs}, {routing}; {how}; "
          f"load average {os.getloadavg()[0]:.1f} at the start)\n")
    print("| activations | width | fixed GB/s | nested GB/s | nested / fixed time | fixed µs/call | nested µs/call |")
    print("|---|---|---|---|---|---|---|")
    nws = [nest(_random_packed(8, n, k, gs, rng)) for _ in range(experts)]
    x = tvm.runtime.tensor(rng.standard_normal((1, k)).astype(np.float32), dev)
    y = tvm.runtime.tensor(np.zeros((top_k, n), np.float32), dev)
    id_sets = [tvm.runtime.tensor(rng.choice(experts, top_k, replace=False).astype(np.int32), dev)
               for _ in range(1 if hot else 16)]
    fixed_pws = {bits: [_random_packed(bits, n, k, gs, rng) for _ in range(experts)] for bits in WIDTHS}
    for mode in modes:  # each mode's kernels read the layout tiles chosen for them (kernel_tile)
        nested = stack_kernel_layouts([nested_kernel_layout(nw, kernel_tile(target, n, None, mode)) for nw in nws])
        nargs = [tvm.runtime.tensor(nested[f"seg{s}"], dev) for s in range(4)] + [
            tvm.runtime.tensor(nested["scale"], dev), tvm.runtime.tensor(nested["zero"], dev)]
        nmod = compile_kernel(make_nested_gemv(8, n, k, gs, experts, top_k, target, activations=mode), target)
        for bits in WIDTHS:
            try:
                fmod = compile_kernel(make_gemv(bits, n, k, gs, experts, top_k, target, activations=mode), target)
                fmode = mode
            except MoecError:  # no fixed kernel of this width and mode here (AVX2 int8, 3 bits): what a bundle runs
                fmode = "float32"
                fmod = compile_kernel(make_gemv(bits, n, k, gs, experts, top_k, target, activations=fmode), target)
            fixed = stack_kernel_layouts([to_kernel_layout(p, kernel_tile(target, n, bits, fmode))
                                          for p in fixed_pws[bits]])
            fargs = [tvm.runtime.tensor(fixed[a], dev) for a in ("weight", "scale", "zero")]
            prec = tvm.runtime.tensor(np.full(experts, bits, np.int32), dev)

            tf, tn = [], []  # fixed and nested calls interleaved, so both see the same machine load
            for c in range(calls):
                ids = id_sets[c % len(id_sets)]
                t0 = clock()
                fmod["gemv"](x, *fargs, ids, y)
                t1 = clock()
                nmod["gemv"](x, *nargs, prec, ids, y)
                tf.append(t1 - t0)
                tn.append(clock() - t1)
            tf, tn = statistics.median(tf[3:]), statistics.median(tn[3:])
            fixed_bytes = top_k * sum(fixed[a][0].nbytes for a in ("weight", "scale", "zero"))
            nested_bytes = top_k * nws[0].nbytes(bits)  # planes of this width + scales + 8-bit zeros
            label = mode if fmode == mode else f"{mode} (fixed: {fmode}, no {mode} kernel)"
            print(f"| {label} | {bits} | {fixed_bytes / tf / 1e9:.2f} | {nested_bytes / tn / 1e9:.2f} | {tn / tf:.2f}x | "
                  f"{tf * 1e6:.0f} | {tn * 1e6:.0f} |", flush=True)
    print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)")


# -- 2. decode ----------------------------------------------------------------------------
def _decode_times(sess: BundleSession, steps: int, clock=time.perf_counter) -> float:
    sess.reset()
    for t in range(3, 11):
        sess.step(t)
    times = []
    for i in range(steps):
        t0 = clock()
        sess.step(11 + i % 50)
        times.append(clock() - t0)
    return statistics.median(times[2:])


def olmoe_shaped(layers: int) -> MoEConfig:
    return MoEConfig(vocab_size=4096, hidden_size=2048, num_layers=layers, num_heads=16, num_kv_heads=16,
                     num_experts=64, top_k=8, expert_intermediate=1024, norm_topk_prob=False)


def nested_bundle(big: MoEConfig, plan: BitPlan, out: Path) -> Path:
    w8 = random_weights(big, storage_plan(plan, 8))
    params = build_nested_params(big, plan, w8.packed, w8.floats, 8)
    del w8
    return build_bundle_from_params(big, plan, params, load_target("host"), out, None,
                                    extra_manifest={"nested": {"storage_bits": 8}})


def latency_part(layers: int, gs: int, steps: int, plot: str) -> None:
    from moec.runtime.adapt import LatencyController
    big = olmoe_shaped(layers)
    print(f"\n## --adapt latency: {steps} decode steps, target lowered at step {steps // 2} (OLMoE-shaped, "
          f"{layers} layers, one nested bundle)\n")
    with tempfile.TemporaryDirectory(prefix="moec-dyn-") as d:
        sess = BundleSession(nested_bundle(big, expert_plan(big, lambda l, e: 8, gs, "u8"), Path(d) / "nested"))
        ladder = sess.plan_ladder(8)
        sess.set_plan(ladder[0])
        wide = _decode_times(sess, 16)
        sess.set_plan(ladder[-1])
        narrow = _decode_times(sess, 16)
        first, second = 1.5 * wide, (wide + narrow) / 2
        ctl = LatencyController(ladder, first, window=8)
        sess.set_plan(ladder[0])
        sess.reset()
        for t in range(3, 11):
            sess.step(t)
        times, bits, targets = [], [], []
        for i in range(steps):
            if i == steps // 2:
                ctl.target_s = second
            t0 = time.perf_counter()
            sess.step(11 + i % 50)
            dt = time.perf_counter() - t0
            times.append(dt)
            bits.append(sess.plan.average_expert_bits())
            targets.append(ctl.target_s)
            wanted = ctl.observe(dt)
            if wanted is not None:
                sess.set_plan(wanted)
        switches = [s.step for s in sess.switches[3:]]
        sess.close()
    print(f"widest plan {wide * 1e3:.1f} ms a step, narrowest {narrow * 1e3:.1f} ms; target {first * 1e3:.1f} ms, "
          f"then {second * 1e3:.1f} ms from step {steps // 2}; {len(switches)} switches\n")
    print("| steps | target ms | median step ms | mean expert bits at the end |")
    print("|---|---|---|---|")
    for a in range(0, steps, steps // 8):
        b = a + steps // 8
        print(f"| {a}–{b - 1} | {targets[a] * 1e3:.1f} | {statistics.median(times[a:b]) * 1e3:.1f} | {bits[b - 1]:.2f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([t * 1e3 for t in times], lw=0.8, label="step time (ms)")
    ax.plot([t * 1e3 for t in targets], "k--", lw=1, label="target (ms)")
    ax.set_xlabel("decode step")
    ax.set_ylabel("ms")
    ax2 = ax.twinx()
    ax2.plot(bits, color="tab:red", lw=1.2, label="mean expert bits")
    ax2.set_ylabel("mean expert bits")
    fig.legend(loc="upper right")
    fig.tight_layout()
    Path(plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=100)
    print(f"\nplot written to {plot}")


def _speed_plans(big, gs: int) -> dict:
    """The five plans the decode and prefill parts time: uniform 8/4/3/2 and a mixed 2/4/8 plan."""
    return {"uniform 8": expert_plan(big, lambda l, e: 8, gs, "u8"),
            "uniform 4": expert_plan(big, lambda l, e: 4, gs, "u4"),
            "uniform 3": expert_plan(big, lambda l, e: 3, gs, "u3"),
            "uniform 2": expert_plan(big, lambda l, e: 2, gs, "u2"),
            "mixed 2/4/8": expert_plan(big, lambda l, e: (2, 4, 2, 8)[e % 4], gs, "mixed")}


def decode_part(layers: int, gs: int, steps: int, rounds: int, cpu_time: bool = False) -> None:
    big = olmoe_shaped(layers)
    plans = _speed_plans(big, gs)
    preset = load_target("host")
    # --cpu-time: one TVM thread, so a step runs on the calling thread and its CPU time is the step's
    threads, clock = (1, time.thread_time) if cpu_time else (None, time.perf_counter)
    how = "CPU time of the calling thread, 1 TVM thread" if cpu_time else "wall time, the session's threads"
    print(f"\n## Decode: one nested bundle vs a fixed bundle per plan (OLMoE-shaped random model: hidden 2048, "
          f"64 experts × 1024, top-8, {layers} layers; group {gs}; median over {rounds} interleaved "
          f"rounds of each round's median of {steps} steps; {how}; load average {os.getloadavg()[0]:.1f} "
          f"at the start)\n")
    with tempfile.TemporaryDirectory(prefix="moec-dyn-") as d:
        first = next(iter(plans.values()))
        w8 = random_weights(big, storage_plan(first, 8))
        params = build_nested_params(big, first, w8.packed, w8.floats, 8)
        stored = params.nbytes
        del w8
        t0 = time.time()
        path = build_bundle_from_params(big, first, params, preset, Path(d) / "nested", None,
                                        extra_manifest={"nested": {"storage_bits": 8}})
        del params
        print(f"(nested bundle: {stored / 1e6:.0f} MB stored, built in {time.time() - t0:.0f} s)\n")
        fixed = {}
        for name, plan in plans.items():
            w = random_weights(big, plan)
            fparams = build_params(big, plan, w.packed, w.floats)
            expert = sum(p.nbytes for n, p in w.packed.items() if ".experts." in n)
            del w
            fpath = build_bundle_from_params(big, plan, fparams, preset, Path(d) / f"fixed{len(fixed)}", None)
            del fparams
            fixed[name] = (expert, BundleSession(fpath, threads=threads))
        nested = BundleSession(path, threads=threads)
        times = {name: ([], []) for name in plans}
        for r in range(rounds):  # nested and fixed interleaved plan by plan, so both see the same load
            for name, plan in plans.items():
                nested.set_plan(plan)
                pair = [("n", nested), ("f", fixed[name][1])]
                for kind, sess in (pair if r % 2 == 0 else pair[::-1]):
                    times[name][kind == "f"].append(_decode_times(sess, steps, clock))
        rows = {}
        for name, plan in plans.items():
            nested.set_plan(plan)
            rows[name] = [nested.expert_bytes(), statistics.median(times[name][0]), fixed[name][0],
                          statistics.median(times[name][1])]
            fixed[name][1].close()
        switch = []
        names = list(plans)
        for i in range(20):
            switch.append(nested.set_plan(plans[names[i % len(names)]]).seconds)
        nested.close()
        print("| plan | nested: expert MB read | nested tok/s | fixed: expert MB | fixed tok/s | nested / fixed speed |")
        print("|---|---|---|---|---|---|")
        for name, (nb, nt, fb, ft) in rows.items():
            print(f"| {name} | {nb / 1e6:.0f} | {1 / nt:.2f} | {fb / 1e6:.0f} | {1 / ft:.2f} | {ft / nt:.2f} |")
        step = statistics.median(r[1] for r in rows.values())
        print(f"\nplan switch (set_plan: validate + replace {layers} width tables): median "
              f"{statistics.median(switch) * 1e3:.2f} ms, max {max(switch) * 1e3:.2f} ms over 20 switches; "
              f"median decode step {step * 1e3:.1f} ms; load average {os.getloadavg()[0]:.1f} at the end")


# -- 2b. prefill --------------------------------------------------------------------------
def _prefill_seconds(sess: BundleSession, n: int, steps: bool = False) -> float:
    """Seconds to feed a prompt of ``n`` tokens from an empty cache: one ``prefill`` call, or (``steps``)
    one decode step a token, as nested bundles prefilled before they had a prefill function."""
    prompt = [3 + i % 97 for i in range(n)]
    sess.reset()
    t0 = time.perf_counter()
    if steps:
        for t in prompt:
            sess.step(t)
    else:
        sess.prefill(prompt)
    return time.perf_counter() - t0


def prefill_part(layers: int, gs: int, tokens: list[int], rounds: int) -> None:
    big = olmoe_shaped(layers)
    plans = _speed_plans(big, gs)
    preset = load_target("host")
    print(f"\n## Prefill: one nested bundle (nested grouped GEMMs) vs a fixed bundle per plan vs the nested "
          f"bundle's decode steps (OLMoE-shaped random model: hidden 2048, 64 experts × 1024, top-8, {layers} "
          f"layers; group {gs}; tok/s = prompt tokens / seconds, median over {rounds} interleaved rounds)\n")
    with tempfile.TemporaryDirectory(prefix="moec-dyn-") as d:
        nested = BundleSession(nested_bundle(big, next(iter(plans.values())), Path(d) / "nested"))
        assert nested.has_prefill
        fixed = {}
        for name, plan in plans.items():
            w = random_weights(big, plan)
            fparams = build_params(big, plan, w.packed, w.floats)
            del w
            fixed[name] = BundleSession(build_bundle_from_params(big, plan, fparams, preset,
                                                                 Path(d) / f"fixed{len(fixed)}", None))
            del fparams
        for sess in [nested, *fixed.values()]:  # warm up (first calls allocate)
            _prefill_seconds(sess, 8)
        load = [os.getloadavg()[0]]
        times = {(name, n, kind): [] for name in plans for n in tokens for kind in ("nested", "fixed", "steps")}
        for r in range(rounds):
            for n in tokens:
                for name, plan in plans.items():
                    nested.set_plan(plan)
                    runs = [("nested", nested, False), ("fixed", fixed[name], False), ("steps", nested, True)]
                    for kind, sess, steps in (runs if r % 2 == 0 else runs[::-1]):
                        times[(name, n, kind)].append(_prefill_seconds(sess, n, steps))
        for sess in [nested, *fixed.values()]:
            sess.close()
        load.append(os.getloadavg()[0])
    print(f"load average {load[0]:.1f} at the start of the timed rounds, {load[1]:.1f} at the end\n")
    print("| plan | tokens | nested prefill tok/s | fixed prefill tok/s | nested / fixed speed | "
          "nested decode steps tok/s | prefill / steps speed |")
    print("|---|---|---|---|---|---|---|")
    for n in tokens:
        for name in plans:
            tn, tf, ts = (statistics.median(times[(name, n, k)]) for k in ("nested", "fixed", "steps"))
            print(f"| {name} | {n} | {n / tn:.1f} | {n / tf:.1f} | {tf / tn:.2f} | {n / ts:.1f} | {ts / tn:.1f}x |")


# -- 3. accuracy --------------------------------------------------------------------------
def accuracy_part(checkpoint: str, data: str, gs: int, max_tokens: int, calib: str | None = None,
                  rows: str = "all") -> None:
    base = load_checkpoint(checkpoint)
    cfg = base.cfg
    windows, _ = file_windows(load_tokenizer(checkpoint), data, 256, max_tokens, cfg.max_position)
    float_res = evaluate_windows(base, windows)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    print(f"\n## Accuracy of derived widths ({checkpoint}, {data}: {float_res.tokens} tokens; every routed expert "
          f"at the width, RTN group {gs}, other weights float; float model: ppl {float_res.perplexity:.2f}, "
          f"top-1 {100 * float_res.top1:.2f} %)\n")
    if rows != "searched":
        print("| width | storage | ppl derived | ppl direct | top-1 derived % | top-1 direct % | top-1 derived − direct (points) |")
        print("|---|---|---|---|---|---|---|")

    def with_experts(fn) -> float:
        """The model with routed expert ``e`` of layer ``l`` replaced by ``fn(l, e, w)``, evaluated."""
        model = load_checkpoint(checkpoint)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for layer in cfg.moe_layers:
                for proj in ("w1", "w3", "w2"):
                    stack = params[f"layers.{layer}.mlp.{proj}"]
                    for e in range(cfg.num_experts):
                        stack[e].copy_(torch.from_numpy(fn(layer, e, state[f"layers.{layer}.mlp.{proj}"][e].numpy())))
        return evaluate_windows(model, windows)

    for storage in (8, 4) if rows in ("all", "widths") else ():
        for bits in (2, 3, 4):
            derived = with_experts(lambda l, e, w: dequantize_nested(nest(pack_weight(w, storage, gs)), bits))
            direct = with_experts(lambda l, e, w: pack_weight(w, bits, gs).dequantize())
            print(f"| {bits} | nested {storage} | {derived.perplexity:.2f} | {direct.perplexity:.2f} | "
                  f"{100 * derived.top1:.2f} | {100 * direct.top1:.2f} | {100 * (derived.top1 - direct.top1):+.2f} |")
    if calib is None or rows == "widths":
        return
    plan, mem_frac = _searched_plan(checkpoint, cfg, calib, gs)
    nested = with_experts(lambda l, e, w: dequantize_nested(nest(pack_weight(w, 8, gs)), plan.experts[l][e]))
    fixed = with_experts(lambda l, e, w: pack_weight(w, plan.experts[l][e], gs).dequantize())
    counts = {b: sum(row[e] == b for row in plan.experts.values() for e in row) for b in WIDTHS}
    print(f"\nSearched plan (greedy on proxy sensitivity profiled on {calib}, the front plan nearest the middle "
          f"of the all-2-bit..all-8-bit memory range: {100 * mem_frac:.0f} %; experts at 2/3/4/8 bits: "
          f"{'/'.join(str(counts[b]) for b in WIDTHS)}, mean {plan.average_expert_bits():.2f}):\n")
    print("| plan | served | ppl | top-1 % |")
    print("|---|---|---|---|")
    print(f"| searched | nested 8 (derived widths) | {nested.perplexity:.2f} | {100 * nested.top1:.2f} |")
    print(f"| searched | fixed (quantized at each width) | {fixed.perplexity:.2f} | {100 * fixed.top1:.2f} |")


def _searched_plan(checkpoint: str, cfg: MoEConfig, calib: str, gs: int) -> tuple[BitPlan, float]:
    """The search's nested plan front (``searched_front_plans``) on a proxy-sensitivity profile, and its
    plan nearest the middle of the memory range (with that plan's place in the range, 0..1)."""
    from moec import api
    from moec.quant.accounting import plan_memory
    from moec.search.nested_front import searched_front_plans
    from moec.search.problem import build_problem
    model = load_checkpoint(checkpoint)
    stats = api.profile(checkpoint, api.DataConfig(calib, 256, 16384, 8), progress=False, model=model,
                        sensitivity=api.SensitivityConfig("proxy", WIDTHS, gs, "rtn"))
    norms = plan_memory(model, BitPlan({}, {}, gs)).kind_total("norms/bias")
    problem = build_problem(cfg, stats, 1.0, WIDTHS + (16,), norms, {"re:.*": 16}, gs, "rtn")
    plans = searched_front_plans(problem, 8, load_target("host"), rungs=8)
    mems = [problem.memory(problem.from_plan(p)) for p in plans]
    lo, hi = min(mems), max(mems)
    i = min(range(len(plans)), key=lambda k: abs(mems[k] - (lo + hi) / 2))
    return plans[i], (mems[i] - lo) / (hi - lo)


# -- 3b. a second, holdout-style family (random weights) ------------------------------------
def holdout_part(gs: int, seed: int = 0) -> None:
    """Qwen2-MoE-shaped model with random weights (no trained checkpoint of a second family ships):
    each width derived from nested storage vs quantized directly, scored against the float model's
    logits (relative error, top-1 agreement), not perplexity."""
    from moec.models.model import MoEModel
    cfg = MoEConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, num_experts=16,
                    top_k=4, expert_intermediate=256, norm_topk_prob=False, shared_intermediate=512,
                    shared_gate=True, attention_bias=True, architecture="Qwen2MoeForCausalLM")
    torch.manual_seed(seed)
    model = MoEModel(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (8, 256), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ref = model(ids).float()
    top = ref.argmax(-1)
    print(f"\n## Second family: Qwen2-MoE-shaped, RANDOM weights (seed {seed}; hidden 256, 4 layers, 16 experts "
          f"top-4, shared expert; {ids.numel()} random tokens): error against the float model's logits, "
          f"every routed expert at the width, RTN group {gs}\n")
    print("| width | storage | rel. logit error derived | rel. logit error direct | top-1 agreement derived % "
          "| top-1 agreement direct % |")
    print("|---|---|---|---|---|---|")

    def scored(fn) -> tuple[float, float]:
        with torch.no_grad():
            for layer in cfg.moe_layers:
                for proj in ("w1", "w3", "w2"):
                    key = f"layers.{layer}.mlp.{proj}"
                    stack = dict(model.named_parameters())[key]
                    for e in range(cfg.num_experts):
                        stack[e].copy_(torch.from_numpy(fn(state[key][e].numpy())))
            out = model(ids).float()
        return float((out - ref).norm() / ref.norm()), float((out.argmax(-1) == top).float().mean())

    for storage in (8, 4):
        for bits in (2, 3, 4):
            d_err, d_top = scored(lambda w: dequantize_nested(nest(pack_weight(w, storage, gs)), bits))
            q_err, q_top = scored(lambda w: pack_weight(w, bits, gs).dequantize())
            print(f"| {bits} | nested {storage} | {d_err:.4f} | {q_err:.4f} | {100 * d_top:.2f} | {100 * q_top:.2f} |")


# -- 5. drift ----------------------------------------------------------------------------
def _bundle_nll(sess: BundleSession, ids: list[int], span: int) -> tuple[float, int]:
    """Mean next-token NLL of ``ids`` scored by teacher-forced decode steps, the cache reset every ``span``."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, span):
        chunk = ids[start:start + span + 1]
        sess.reset()
        for a, b in zip(chunk[:-1], chunk[1:]):
            logits = sess.step(a).astype(np.float64)
            top = logits.max()
            nll += float(np.log(np.exp(logits - top).sum()) + top - logits[b])
            count += 1
    return nll / count, count


def _searched_like(checkpoint: str, text, tok, like: BitPlan, gs: int, tmp: Path) -> BitPlan:
    """``like`` with the expert widths the greedy search picks at no more expert bytes (fixed-format
    accounting over the nested widths 2/3/4/8) from a proxy-sensitivity profile of ``text`` (a path, or
    token ids written out as text)."""
    import dataclasses
    from moec.pipeline.profile import DataConfig, SensitivityConfig, profile
    from moec.search.cost import CostConfig
    from moec.search.driver import SearchOptions, run_search
    from moec.search.estimator import AnalyticEstimator
    from moec.search.problem import build_problem
    if not isinstance(text, Path):
        (tmp / "adapt.txt").write_text(tok.decode(text), encoding="utf-8")
        text = tmp / "adapt.txt"
    widths = (2, 3, 4, 8)
    stats = profile(checkpoint, DataConfig(str(text)), progress=False,
                    sensitivity=SensitivityConfig("proxy", widths, gs, "rtn"))
    cfg = load_checkpoint(checkpoint).cfg
    prob = build_problem(cfg, stats, 1.0, widths + (16,), 0, group_size=gs, method="rtn")
    cols = [prob.bits.index(b) for b in widths]
    prob = dataclasses.replace(prob, bits=widths, nbytes=prob.nbytes[:, cols], loss=prob.loss[:, cols])
    assign = np.array([widths.index(like.experts[l][e]) for l, e in prob.items])
    prob.budget_bytes = prob.memory(assign)
    result = run_search(prob, CostConfig(), AnalyticEstimator.for_target(load_target("host")),
                        SearchOptions(policy="greedy"))
    plan = like.copy()
    plan.experts = {l: dict(result.plan.experts[l]) for l in like.experts}
    return plan


def drift_part(checkpoint: str, calib: str, shifted: str, gs: int, tokens: int, window: int, threshold: float) -> None:
    from click.testing import CliRunner
    from moec.cli.main import cli
    from moec.runtime.adapt import DriftController

    tok = load_tokenizer(checkpoint)
    text = Path(shifted).read_text(encoding="utf-8", errors="replace")
    ids = tok.encode(text).ids[:2 * tokens]
    adapt_ids, held = ids[:len(ids) // 2], ids[len(ids) // 2:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nested"
        res = CliRunner().invoke(cli, ["compile", checkpoint, "--plan", "uniform:8", "--group-size", str(gs),
                                       "--method", "rtn", "--nested", "8", "--data", calib, "--out", str(out)])
        if res.exit_code != 0:
            raise SystemExit(res.output)
        with BundleSession(out) as sess:
            sess.set_plan("uniform:8")
            full = sess.expert_bytes()
            sess.set_plan("uniform:2")
            narrow = sess.expert_bytes()
            budget = narrow + 0.4 * (full - narrow)
            calib_plan = sess.memory_plan(budget)
            sess.set_plan(calib_plan)
            monitor = sess.drift_monitor(window=window, threshold=threshold)
            ctl = DriftController(sess, monitor)
            new_plan, at = None, []
            sess.reset()
            for i, t in enumerate(adapt_ids):
                if i and i % 512 == 0:
                    sess.reset()
                sess.step(t)
                plan = ctl.observe(0.0)
                if plan is not None:
                    new_plan = plan
                    at.append(i + 1)
                    sess.set_plan(plan)
            distances = monitor.history
            layers = len(sess._model_cfg.moe_layers)
            replanned_bytes = sess.expert_bytes()
            sess.drift = None
            sess.set_plan(calib_plan)
            calib_bytes = sess.expert_bytes()
            nll_calib, n = _bundle_nll(sess, held, 512)
            nll_new = None
            if new_plan is not None:
                sess.set_plan(new_plan)
                nll_new, _ = _bundle_nll(sess, held, 512)
            searched = []  # (row name, expert bytes, nll): the search's plan at the calibration plan's bytes
            for name, text in ((f"searched, sensitivity of {Path(calib).name}", Path(calib)),
                               ("searched, sensitivity of the adapt half (oracle re-plan)", adapt_ids)):
                sess.set_plan(_searched_like(checkpoint, text, tok, calib_plan, gs, Path(tmp)))
                searched.append((name, sess.expert_bytes(), _bundle_nll(sess, held, 512)[0]))
    print(f"\n## Domain shift: calibrated on {calib} (Python docs), served on {shifted} "
          f"({len(adapt_ids)} tokens to adapt on, {n} held-out tokens scored)\n")
    print(f"Drift monitor (total variation of routing vs the reference, mean over {layers} MoE layers, "
          f"windows of {window} tokens, threshold {threshold}; the reference becomes the online routing after a re-plan): "
          + ", ".join(f"{d:.3f}" for d in distances))
    print(f"\nre-planned after token(s) {', '.join(map(str, at))}\n" if at else "\nno drift detected\n")
    print("| plan | expert MB | held-out ppl (new domain) |")
    print("|---|---|---|")
    print(f"| calibration-time (profile of {Path(calib).name}) | {calib_bytes / 1e6:.3f} | {np.exp(nll_calib):.2f} |")
    if nll_new is not None:
        print(f"| re-planned on drift (online frequencies) | {replanned_bytes / 1e6:.3f} | {np.exp(nll_new):.2f} |")
    for name, nbytes, nll in searched:
        print(f"| {name} | {nbytes / 1e6:.3f} | {np.exp(nll):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="kernel,decode,accuracy")
    ap.add_argument("--layers", type=int, default=2, help="Layers of the OLMoE-shaped model.")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calls", type=int, default=200, help="GEMV calls timed per kernel.")
    ap.add_argument("--cpu-time", action="store_true",
                    help="Kernel and decode parts: time each call (decode step) as the calling thread's CPU time "
                         "with one TVM thread (sets TVM_NUM_THREADS=1 for the whole run): not inflated by "
                         "preemption on a loaded machine.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="TVM threads of the run without --cpu-time (default: every core).")
    ap.add_argument("--accuracy-rows", choices=("all", "widths", "searched"), default="all",
                    help="Accuracy part: the per-width table, the searched-plan rows, or both.")
    ap.add_argument("--rounds", type=int, default=3, help="Decode part: interleaved nested/fixed rounds per plan.")
    ap.add_argument("--modes", default="float32",
                    help="Kernel and modes parts: activation modes, comma-separated (float32, int8).")
    ap.add_argument("--hot", action="store_true", help="Kernel part: the same 8 experts every call (in cache).")
    ap.add_argument("--nested-int8-tile", type=int, default=None,
                    help="x86: X86Params.nested_int8_tile for this run (the int8 nested GEMV's layout tile; "
                         "128: whole-tile tasks), to compare with a run at the default.")
    ap.add_argument("--plans", default=None,
                    help='Modes part: plan names, comma-separated (e.g. "uniform 8,uniform 4"); default all five.')
    ap.add_argument("--clocks", default="wall,cpu", help="Modes part: wall and/or cpu.")
    ap.add_argument("--prefill-tokens", default="64,512", help="Prefill part: prompt lengths.")
    ap.add_argument("--checkpoint", default="reference/checkpoint")
    ap.add_argument("--data", default="reference/data/heldout.txt")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--plot", default="out/dynamic_latency.png", help="Where the latency part writes its plot.")
    ap.add_argument("--calib", default="reference/data/calib.txt", help="Drift part: the calibration text.")
    ap.add_argument("--shifted", default="/usr/share/common-licenses/GPL-3",
                    help="Drift part: another domain's text, an installed file (GPL-3: Debian package base-files).")
    ap.add_argument("--drift-window", type=int, default=64, help="Drift part: tokens per monitor window.")
    ap.add_argument("--drift-threshold", type=float, default=0.2, help="Drift part: total-variation threshold.")
    ap.add_argument("--drift-tokens", type=int, default=2048, help="Drift part: tokens to adapt on (and as many held out).")
    args = ap.parse_args()
    if args.nested_int8_tile is not None:
        if args.nested_int8_tile not in (0, 16, 32, 64, 128, 256):
            ap.error(f"--nested-int8-tile {args.nested_int8_tile} is not 0 or a power of two from 16 to 256")
        import dataclasses

        from moec.lower.schedules import x86
        x86.PARAMS = dataclasses.replace(x86.PARAMS, nested_int8_tile=args.nested_int8_tile)
    torch.set_num_threads(2)
    # read when TVM's thread pool starts (the first kernel call); unset, TVM starts half the cores on x86
    # (one worker on a 2-core machine), which the kernel part's wall times then measured
    os.environ["TVM_NUM_THREADS"] = "1" if args.cpu_time else str(args.threads)
    parts = args.parts.split(",")
    modes = tuple(args.modes.split(","))
    if "kernel" in parts:
        kernel_part(args.group_size, args.calls, args.cpu_time, modes, args.hot)
    if "modes" in parts:
        from dynamic_modes import modes_part
        modes_part(args.layers, args.group_size, args.steps, args.rounds, list(modes),
                   args.plans.split(",") if args.plans else None, args.clocks.split(","))
    if "decode" in parts:
        decode_part(args.layers, args.group_size, args.steps, args.rounds, args.cpu_time)
    if "prefill" in parts:
        prefill_part(args.layers, args.group_size, [int(t) for t in args.prefill_tokens.split(",")], args.rounds)
    if "latency" in parts:
        latency_part(args.layers, args.group_size, 200, args.plot)
    if "accuracy" in parts:
        accuracy_part(args.checkpoint, args.data, args.group_size, args.max_tokens, args.calib, args.accuracy_rows)
    if "holdout" in parts:
        holdout_part(args.group_size)
    if "drift" in parts:
        drift_part(args.checkpoint, args.calib, args.shifted, args.group_size, args.drift_tokens, args.drift_window,
                   args.drift_threshold)


if __name__ == "__main__":
    main()
