"""GPU check (issue 17): CUDA bundles of the reference model vs the CPU bundle, decode speed, bandwidth, NVML J/token.

Run by ``tools/gpu_check.sh`` on a machine with an NVIDIA GPU. For each plan (uniform:8, uniform:4,
a mixed 2/4/8-bit plan; ``nested``: that mixed plan served at run time from 8-bit nested storage,
``moec compile --nested 8``, then switched to all-2-bit) it builds a ``host`` bundle and a ``cuda`` bundle (arch from nvidia-smi),
checks that greedy tokens on the GPU equal the CPU bundle's (the prompt through the CUDA prefill), times a
256-token prefill against the same tokens fed as decode steps (and compares their logits), times GPU decode
steps (tokens/s, effective weight bandwidth = modelled bytes per step x steps/s, against the GPU's measured
device-to-device copy bandwidth) with NVML energy sampled during the timed loop, and times torch
eager fp16 decode of the same checkpoint on the GPU; before them, the backend's routed-expert GEMVs
(fixed widths, and the nested 8-bit stack at each run-time width; ``tools/gpu_kernels.py``) give GB/s.
Every stage fails soft: a failure becomes a row note and the table is printed with whatever was measured.

Two halves, as a device without TVM's compiler (a Jetson, a GPU server with the TVM runtime alone) needs:
``--prepare DIR --arch sm_XX`` builds everything here (TVM compiler and nvcc, no GPU: the CUDA bundles,
the CPU bundles' greedy tokens, the kernels), ``--from DIR`` runs the GPU half there. Without either, one
process does both on a GPU machine.

Without a GPU the GPU half stops with a one-line error (exit 2); ``--dry-run`` prints what it would do.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

PROMPT = "The list type is"
PREFILL_TOKENS = 256  # the prompt the CUDA prefill is timed on (the prompt's ids repeated)
INT8 = "@int8"  # a plan name suffix: bundles with int8 activations
NO_GRAPHS = "@nographs"  # a plan name suffix: the CUDA bundle launches every kernel (the CUDA graphs' A/B baseline)


def plan_flags(name: str) -> tuple[str, set[str]]:
    """(base plan name, suffixes) of ``NAME[@int8][@nographs]`` (suffixes in any order)."""
    flags = set()
    while True:
        suffix = next((f for f in (INT8, NO_GRAPHS) if name.endswith(f)), None)
        if suffix is None:
            return name, flags
        name, flags = name.removesuffix(suffix), flags | {suffix}


def gpu_info() -> dict:
    """Name, compute capability and driver of GPU 0 from nvidia-smi ({} without it)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    res = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    name, cap, driver, mem = [s.strip() for s in res.stdout.strip().splitlines()[0].split(",")][:4]
    return {"name": name, "compute_cap": cap, "driver": driver, "memory": mem}


def mixed_plan(cfg, group: int):
    """A mixed plan without a profile: experts alternate 2/4 bits (every third at 8), everything else 8."""
    from moec.core.plan import BitPlan
    experts = {l: {e: (8 if e % 3 == 2 else 2 if e % 2 else 4) for e in range(cfg.num_experts)}
               for l in cfg.moe_layers}
    return BitPlan(experts, {"router": 16, "re:.*": 8}, group, "mse", cfg.fingerprint(),
                   {"policy": "gpu-check-mixed-2/4/8"})


def plans_for(cfg, names: list[str], group: int = 64) -> dict:
    from moec.core.errors import MoecError
    from moec.core.plan import resolve_plan
    out = {}
    for name in names:
        base, _ = plan_flags(name)  # NAME@int8: both bundles with int8 activations (the GPU's dp4a bodies)
        if base in ("mixed", "nested"):  # nested: the mixed plan as the run-time plan of an 8-bit nested bundle
            out[name] = mixed_plan(cfg, group).validate(cfg)
        elif base.startswith("uniform:"):
            out[name] = resolve_plan(base, cfg, group)
        else:
            raise MoecError(f"unknown plan '{name}'; expected uniform:B, mixed or nested, each optionally {INT8} "
                            f"and/or {NO_GRAPHS}")
    return out


def graphless_target(target: str, folder: Path) -> str:
    """A preset file in ``folder``: ``target`` (its arch resolved) with ``cuda_graphs: false``."""
    import yaml

    from moec.core.targets import load_target
    preset = load_target(target)
    path = folder / f"{preset.name}-nographs.yaml"
    path.write_text(yaml.safe_dump(preset.model_copy(update={"cuda_graphs": False}).model_dump(mode="json")))
    return str(path)


def build(checkpoint: Path, plan, target: str, out: Path, nested: int | None = None,
          activations: str = "auto") -> Path:
    from moec.pipeline.compile import CompileConfig, compile_bundle
    return compile_bundle(CompileConfig(checkpoint=checkpoint, out=out, target=target, plan=plan, force=True,
                                        nested=nested, activations=activations))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> tuple[float, str]:
    """Device-to-device copy bandwidth (read + write bytes / s) of GPU 0: torch if it has CUDA, else TVM."""
    try:
        import torch
        if torch.cuda.is_available():
            a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
            b = torch.empty_like(a)
            b.copy_(a)
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(10):
                t0 = time.perf_counter()
                b.copy_(a)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            return 2 * nbytes / best / 1e9, "torch copy_"
    except ImportError:
        pass
    import tvm
    dev = tvm.runtime.cuda(0)
    a = tvm.runtime.empty((nbytes // 4,), "float32", dev)
    b = tvm.runtime.empty((nbytes // 4,), "float32", dev)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        a.copyto(b)
        dev.sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9, "tvm copyto"


def timed_decode(step, reset, steps: int, min_seconds: float = 2.0) -> tuple[int, float, dict | None]:
    """Run decode steps (passes of ``steps`` after ``reset()``) for at least ``min_seconds`` with NVML sampled;
    (steps run, seconds, energy reading or None)."""
    from dataclasses import asdict

    from moec.hardware.energy import Sampler
    from moec.hardware.nvml_energy import NvmlMeter
    try:
        sampler = Sampler([NvmlMeter(0)], period_s=0.02)
    except FileNotFoundError:
        sampler = None
    reset()
    step()  # warm-up (kernel load, first-call allocation)
    done, elapsed = 0, 0.0
    if sampler is not None:
        sampler.start()
    t0 = time.perf_counter()
    while elapsed < min_seconds:
        reset()
        for _ in range(steps):
            step()
        done += steps
        elapsed = time.perf_counter() - t0
    reading = asdict(sampler.stop()) if sampler is not None else None
    return done, elapsed, reading


def energy_cells(row: dict, energy: dict | None, steps: int, missing: str | None = None) -> None:
    """J/token and mean W of a timed loop of ``steps`` decode steps from its NVML reading (``missing`` when none)."""
    if energy and energy["joules"] > 0:
        row["J/token"] = f"{energy['joules'] / steps:.4f}"
        row["W"] = f"{energy['joules'] / energy['seconds']:.0f}"
    elif missing is not None:
        row["J/token"] = missing


def gbs_cell(gbs: float, copy_gbs: float | None) -> str:
    """GB/s, with its share of the device-to-device copy bandwidth where that was measured."""
    return f"{gbs:.1f}" + (f" ({100 * gbs / copy_gbs:.1f} %)" if copy_gbs else "")


def match_cell(got: list[int], want: list[int]) -> str:
    """``yes``, or how many of the CPU bundle's tokens the GPU gave at the same positions."""
    return "yes" if got == want else f"NO ({sum(a == b for a, b in zip(got, want))}/{len(want)})"


def prepare_plan(name: str, plan, args, folder: Path) -> dict:
    """Build ``name``'s CUDA bundle under ``folder`` and a host bundle (discarded) for the tokens it must match;
    what the GPU half needs."""
    from moec.hardware.energy_model import decode_traffic
    from moec.models.checkpoint import load_config
    from moec.runtime.session import BundleSession
    tag = name.replace(":", "").replace("@", "-")
    base, flags = plan_flags(name)
    nested = 8 if base == "nested" else None  # the nested GEMV: planes read per expert width
    acts = "int8" if INT8 in flags else "auto"  # auto: float32 on CUDA, the host's int8 on a VNNI CPU
    gpu_target = graphless_target(args.gpu_target, folder) if NO_GRAPHS in flags else args.gpu_target
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu-check-host-") as tmp:  # the folder keeps only the GPU half's
        host = build(args.checkpoint, plan, "host", Path(tmp) / "bundle", nested, acts)
        build(args.checkpoint, plan, gpu_target, folder / f"cuda-{tag}", nested, acts)
        entry = {"name": name, "bundle": f"cuda-{tag}", "build s": round(time.time() - t0), "nested": bool(nested)}
        with BundleSession(host) as cpu:
            ids = cpu.tokenizer.encode(args.prompt).ids
            entry["prompt_ids"] = ids
            entry["want"], cpu_stats = cpu.generate(ids, args.tokens)
            entry["CPU tok/s"] = round(cpu_stats.decode_tokens_per_s, 1)
            if nested:
                cpu.set_plan("uniform:2")
                entry["want_2"] = cpu.generate(ids, args.tokens)[0]
    cfg = load_config(args.checkpoint)
    entry["steps"] = min(64, cfg.max_position - len(ids) - 2)
    entry["step_bytes"] = decode_traffic(cfg, plan)[0]
    return entry


def run_plan(entry: dict, folder: Path, args, row: dict) -> None:
    """The GPU half of one plan: tokens vs the CPU bundle's, a run-time switch (nested), timed decode."""
    from moec.runtime.session import BundleSession
    row["build s"] = str(entry["build s"])
    row["CPU tok/s"] = f"{entry['CPU tok/s']:.1f}"
    ids, want = entry["prompt_ids"], entry["want"]
    with BundleSession(folder / entry["bundle"]) as sess:
        row["tokens = CPU"] = match_cell(sess.generate(ids, len(want))[0], want)
        if entry["nested"]:  # switched at run time on the GPU: all experts 2-bit, then back
            plan = sess.plan
            down = sess.set_plan("uniform:2")
            row["switch = CPU"] = match_cell(sess.generate(ids, len(want))[0], entry["want_2"])
            back = sess.set_plan(plan)
            row["note"] = (f"nested 8-bit storage; switch = CPU: after set_plan(uniform:2); switches "
                           f"{1e3 * down.seconds:.2f} / {1e3 * back.seconds:.2f} ms")
        if sess.has_prefill:  # the CUDA prefill (grouped GEMMs) against the same prompt fed as decode steps
            prefill_cells(sess, ids, row)
        done, secs, energy = timed_decode(lambda: sess.step(7), lambda: (sess.reset(), sess.prefill(ids)),
                                          entry["steps"])
    # prefill (in reset) runs inside the timed loop: its share is one call per ``steps`` decode steps
    row["GPU tok/s"] = f"{done / secs:.1f}"
    gbs = entry["step_bytes"] * done / secs / 1e9
    row["eff. GB/s"] = gbs_cell(gbs, args.copy_gbs)
    energy_cells(row, energy, done, missing="no NVML")


def prefill_cells(sess, ids: list[int], row: dict, tokens: int = PREFILL_TOKENS, runs: int = 5) -> None:
    """Prefill of ``tokens`` prompt tokens (``ids`` repeated) in one call against the same tokens fed as decode steps:
    the best of ``runs`` each (ms), and whether their last logits agree (max difference / max |logit|)."""
    import numpy as np
    prompt = (ids * (tokens // len(ids) + 1))[:min(tokens, sess.cfg["max_position"] - 2)]
    sess.reset()
    sess.reserve(len(prompt))
    best, logits = {}, {}
    for _ in range(runs):
        feeds = (("prefill", lambda: sess.prefill(prompt)), ("steps", lambda: [sess.step(t) for t in prompt][-1]))
        for how, feed in feeds:
            sess.reset()
            t0 = time.perf_counter()
            logits[how] = feed()  # logits come back to the host: the device has finished
            best[how] = min(best.get(how, float("inf")), time.perf_counter() - t0)
    diff = float(np.abs(logits["prefill"] - logits["steps"]).max() / np.abs(logits["steps"]).max())
    row["prefill ms"] = f"{1e3 * best['prefill']:.2f} ({len(prompt)} tok)"
    row["by steps ms"] = f"{1e3 * best['steps']:.2f} ({best['steps'] / best['prefill']:.1f}x)"
    row["prefill = steps"] = "yes" if diff < 1e-3 else f"NO (diff {diff:.1e})"


def check_plan(name: str, plan, args, row: dict) -> None:
    """Build, compare and time one plan in one process; fills ``row`` as it goes (a failure leaves what was measured)."""
    folder = Path(args.out)
    run_plan(prepare_plan(name, plan, args, folder), folder, args, row)


def transformers_fp16(args, row: dict, device: str = "cuda", dtype: str = "float16") -> None:
    """Decode steps of the checkpoint in Hugging Face transformers (its own model class, KV cache, fp16 on
    the GPU; tests use the CPU) -> tok/s, J/token: the engine a user would otherwise run the checkpoint in."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} has no CUDA")
    dt = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    m = AutoModelForCausalLM.from_pretrained(str(args.checkpoint), dtype=dt).to(device).eval()
    ids = Tokenizer.from_file(str(args.checkpoint / "tokenizer.json")).encode(args.prompt).ids
    steps = min(64, m.config.max_position_embeddings - len(ids) - 2)
    state = {}

    def reset():
        state["past"] = m(torch.tensor([ids], device=device), use_cache=True).past_key_values

    def step():
        out = m(torch.tensor([[7]], device=device), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        sync()
    with torch.no_grad():
        done, secs, energy = timed_decode(step, reset, steps)
    row["GPU tok/s" if device == "cuda" else "CPU tok/s"] = f"{done / secs:.1f}"
    energy_cells(row, energy, done)


def torch_fp16(args, row: dict, device: str = "cuda", dtype: str = "float16") -> None:
    """Decode steps of the checkpoint in torch eager (fp16 on the GPU; tests use the CPU) -> tok/s, J/token."""
    import torch

    import moec.models.model as model_mod
    from moec.models.checkpoint import load_checkpoint
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} has no CUDA")
    dt = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rope = model_mod.rope_tables  # moec computes RoPE tables on the CPU in float32: move them over
    model_mod.rope_tables = lambda *a, **k: tuple(t.to(device, dt) for t in rope(*a, **k))
    try:
        m = load_checkpoint(args.checkpoint).to(device=device, dtype=dt)
        from tokenizers import Tokenizer
        ids = Tokenizer.from_file(str(args.checkpoint / "tokenizer.json")).encode(args.prompt).ids
        cache = None
        steps = min(64, m.cfg.max_position - len(ids) - 2)

        def reset():
            nonlocal cache
            cache = m.new_cache()
            m(torch.tensor([ids], device=device), cache)

        def step():
            logits = m(torch.tensor([[7]], device=device), cache)
            sync()
            if not torch.isfinite(logits).all():
                raise RuntimeError(f"torch {dtype} decode gave non-finite logits")
        with torch.no_grad():
            done, secs, energy = timed_decode(step, reset, steps)
    finally:
        model_mod.rope_tables = rope
    row["GPU tok/s" if device == "cuda" else "CPU tok/s"] = f"{done / secs:.1f}"
    energy_cells(row, energy, done)


def kernel_rows(kernels: list[dict], folder: Path, args, rows: list[dict], over_budget) -> None:
    """One row per prepared GEMV (fixed widths; nested 8-bit at each width): GB/s vs the copy, nested vs fixed; per
    prefill grouped GEMM: GFLOP/s."""
    import gpu_kernels
    fixed = {}
    for entry in kernels:
        row = {"plan": gpu_kernels.case_label(entry)}
        rows.append(row)
        if over_budget(row):
            continue
        try:
            secs, gbs = gpu_kernels.measure_prepared(entry, folder)
            row["eff. GB/s"] = gbs_cell(gbs, args.copy_gbs)
            row["note"] = f"{secs * 1e6:.1f} us/call"
            key = (entry["shape"], entry["bits"] if entry["width"] is None else entry["width"],
                   entry.get("activations", "float32"))
            if entry.get("kind") == "gemm":  # compute-bound: its rate (GB/s: the weights once, re-reads not counted)
                row["note"] += f"; {gpu_kernels.gemm_flops(entry) / secs / 1e9:.0f} GFLOP/s"
            elif entry["width"] is None:
                fixed[key] = secs
            elif key in fixed:
                row["note"] += f"; {fixed[key] / secs:.2f}x the fixed {key[1]}-bit speed"
        except Exception as exc:  # noqa: BLE001
            row["note"] = f"failed: {_line(exc)}"
        print(f"[{row['plan']}] " + json.dumps(row), flush=True)


BASELINE = "transformers fp16"
COLUMNS = ["plan", "tokens = CPU", "switch = CPU", "GPU tok/s", "vs HF fp16", "CPU tok/s", "eff. GB/s", "J/token", "W",
           "prefill ms", "by steps ms", "prefill = steps", "build s", "note"]


def table(rows: list[dict]) -> str:
    """The rows as one text table; GPU tok/s also as a ratio to the transformers fp16 row when both exist."""
    from moec.cli.table import format_table
    base = next((r.get("GPU tok/s") for r in rows if r.get("plan") == BASELINE), None)
    for r in rows:
        if base and r.get("GPU tok/s") and r.get("plan") != BASELINE:
            r["vs HF fp16"] = f"{float(r['GPU tok/s']) / float(base):.2f}x"
    return format_table(COLUMNS, [[r.get(c, "-") for c in COLUMNS] for r in rows])


def check_prepare_folder(folder: Path) -> None:
    """The build half replaces ``cuda-*`` bundles and ``kernels/`` in ``folder``: only an empty folder or an
    earlier one of this script's (it has ``prepared.json``) is written into, never somebody's files."""
    from moec.core.errors import MoecError
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir())
                                                    and not (folder / "prepared.json").is_file())):
        raise MoecError(f"'{folder}' exists and is not an empty folder or an earlier --prepare folder "
                        "(no prepared.json); refusing to write into it")


def prepare(args, plans: dict, folder: Path) -> dict:
    """The build half into ``folder`` (``prepared.json`` + bundles + kernels); a failed part is recorded, not raised."""
    import gpu_kernels
    from moec.core.targets import load_target
    folder.mkdir(parents=True, exist_ok=True)
    args.gpu_target = f"cuda:{args.arch}"
    spec: dict = {"arch": args.arch, "prompt": args.prompt, "plans": [], "kernels": []}
    cases = gpu_kernels.kernel_cases(args.kernel_bits, args.shapes, args.kernel_acts) + gpu_kernels.gemm_cases(
        args.kernel_bits, args.shapes)
    if cases:
        try:
            spec["kernels"] = gpu_kernels.prepare(cases, load_target(args.gpu_target).tvm(), folder / "kernels")
        except Exception as exc:  # noqa: BLE001
            spec["kernels"] = [{**c, "failed": _line(exc)} for c in cases]
    for name, plan in plans.items():
        log(f"building {name} (host + {args.gpu_target})")
        try:
            spec["plans"].append(prepare_plan(name, plan, args, folder))
        except Exception as exc:  # noqa: BLE001
            spec["plans"].append({"name": name, "failed": _line(exc)})
    (folder / "prepared.json").write_text(json.dumps(spec, indent=1))
    return spec


def run_gpu(spec: dict, folder: Path, args, started: float) -> list[dict]:
    """The GPU half from a prepared ``spec``: copy bandwidth, kernel rows, plan rows, torch fp16; the rows."""
    import gpu_kernels
    rows: list[dict] = []
    try:
        args.copy_gbs, how = copy_bandwidth_gbs()
        rows.append({"plan": "D2D copy", "eff. GB/s": f"{args.copy_gbs:.0f}", "note": how})
    except Exception as exc:  # noqa: BLE001 - fail soft, report
        args.copy_gbs = None
        rows.append({"plan": "D2D copy", "note": f"failed: {_line(exc)}"})

    def over_budget(row: dict) -> bool:
        if time.monotonic() - started > args.budget_s:
            row["note"] = f"skipped: past the {args.budget_s:g} s budget"
            return True
        return False

    built = [k for k in spec["kernels"] if "failed" not in k]
    rows += [{"plan": gpu_kernels.case_label(k), "note": f"failed: {k['failed']}"}
             for k in spec["kernels"] if "failed" in k]
    kernel_rows(built, folder / "kernels", args, rows, over_budget)
    for entry in spec["plans"]:
        row = {"plan": entry["name"]}
        rows.append(row)
        if "failed" in entry:
            row["note"] = f"failed: {entry['failed']}"
            continue
        if over_budget(row):
            continue
        try:
            run_plan(entry, folder, args, row)
        except Exception as exc:  # noqa: BLE001
            row["note"] = f"failed: {_line(exc)}"
        print(f"[{entry['name']}] " + json.dumps(row), flush=True)
    if not args.no_torch:
        for name, baseline, note in ((BASELINE, transformers_fp16, "Hugging Face eager, KV cache"),
                                     ("torch eager fp16", torch_fp16, "moec's torch reference model (host "
                                      "syncs in its routing loop)")):
            row = {"plan": name, "note": note}
            rows.append(row)
            try:
                if not over_budget(row):
                    baseline(args, row)
            except Exception as exc:  # noqa: BLE001
                row["note"] = f"failed: {_line(exc)}"
    return rows


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=REPO / "reference" / "checkpoint")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "gpu-check")
    ap.add_argument("--prepare", type=Path, metavar="DIR", default=None,
                    help="build the GPU half's inputs into DIR here and stop (TVM compiler and nvcc; no GPU needed)")
    ap.add_argument("--from", dest="prepared", type=Path, metavar="DIR", default=None,
                    help="run the GPU half from a --prepare DIR (the TVM runtime alone is enough)")
    ap.add_argument("--plans", default="uniform:8,uniform:4,mixed,nested",
                    help="comma list of uniform:B, mixed and nested; NAME@int8: both bundles with int8 activations "
                         "(the GPU's dp4a GEMVs, the host's int8 kernels); NAME@nographs: the CUDA bundle without "
                         "CUDA graphs (the A/B baseline of NAME)")
    ap.add_argument("--arch", default=None, help="sm_XX (default: detected by nvidia-smi)")
    ap.add_argument("--tokens", type=int, default=24, help="greedy tokens compared with the CPU bundle")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--no-torch", action="store_true", help="skip the fp16 baselines (transformers; moec's torch model)")
    ap.add_argument("--kernel-bits", default="2,3,4,8",
                    help="bit widths of the GEMV bandwidth rows, fixed and nested ('' for none)")
    ap.add_argument("--shapes", default="olmoe,dram", help="GEMV shapes (tools/gpu_kernels.py SHAPES)")
    ap.add_argument("--kernel-acts", default="float32,int8",
                    help="activations of the GEMV rows: float32 and/or int8 (the dp4a bodies)")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="start no new stage after this many seconds (the table is printed either way)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="resolve everything, print the steps, run nothing")
    args = ap.parse_args(argv)
    started = time.monotonic()
    import gpu_kernels
    from moec.core.errors import MoecError
    try:
        if args.prepare is not None and args.prepared is not None:
            raise MoecError("--prepare builds the inputs and --from runs them: give one")
        if args.prepared is not None:
            try:
                spec = json.loads((args.prepared / "prepared.json").read_text())
            except (OSError, ValueError) as exc:
                raise MoecError(f"--from {args.prepared}: no readable prepared.json ({exc}); "
                                "make one with --prepare DIR") from None
            args.arch, source, plans = spec["arch"], "--prepare", {p["name"]: None for p in spec["plans"]}
        else:
            from moec.core.targets import resolve_cuda_arch
            from moec.models.checkpoint import load_config
            cfg = load_config(args.checkpoint)
            names = [p.strip() for p in args.plans.split(",") if p.strip()]
            plans = plans_for(cfg, names)
            args.arch, source = resolve_cuda_arch(args.arch)
        parts = [b.strip() for b in args.kernel_bits.split(",") if b.strip()]
        bad = [b for b in parts if b not in ("2", "3", "4", "8")]
        if bad:
            raise MoecError(f"--kernel-bits: {', '.join(bad)} not in 2, 3, 4, 8")
        args.kernel_bits = [int(b) for b in parts]
        args.kernel_acts = tuple(a.strip() for a in args.kernel_acts.split(",") if a.strip())
        if not args.kernel_acts or any(a not in ("float32", "int8") for a in args.kernel_acts):
            raise MoecError(f"--kernel-acts: a comma list of float32 and int8, not {','.join(args.kernel_acts)!r}")
        args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in args.shapes if s not in gpu_kernels.SHAPES]
        if unknown:
            raise MoecError(f"--shapes: {', '.join(unknown)} not in {', '.join(gpu_kernels.SHAPES)}")
        if args.prepared is None and not args.dry_run:
            check_prepare_folder(args.prepare or args.out)
    except (MoecError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    info = gpu_info()
    if args.dry_run:
        print(f"gpu: {info.get('name', 'none')} (arch {args.arch} from {source})")
        for name in plans:
            where = (f"run the cuda:{args.arch} bundle prepared in {args.prepared}" if args.prepared else
                     f"build a cuda:{args.arch} bundle under {args.prepare or args.out} (and a host one for its tokens)")
            print(f"plan {name}: {where}, compare {args.tokens} greedy tokens, time decode with NVML"
                  + (" (nested 8-bit storage, then set_plan(uniform:2) compared too)"
                     if plan_flags(name)[0] == "nested" else "")
                  + (" (int8 activations, both bundles)" if INT8 in plan_flags(name)[1] else "")
                  + (" (no CUDA graphs)" if NO_GRAPHS in plan_flags(name)[1] else ""))
        print(f"routed-expert GEMV GB/s at bits {args.kernel_bits or 'none'} (fixed and nested 8-bit), "
              f"shapes {', '.join(args.shapes)}, activations {', '.join(args.kernel_acts)}; prefill grouped GEMM "
              f"GFLOP/s at those bits" + (" (olmoe shape)" if "olmoe" in args.shapes else ": none (no olmoe shape)"))
        print("transformers and torch eager fp16 decode: " + ("skipped" if args.no_torch else "yes"))
        return 0
    if args.prepare is not None:
        spec = prepare(args, plans, args.prepare)
        failed = [p["name"] for p in spec["plans"] if "failed" in p] + \
            [gpu_kernels.case_label(k) for k in spec["kernels"] if "failed" in k]
        print(f"prepared {args.prepare} for {args.arch}: {len(spec['plans'])} plans, {len(spec['kernels'])} kernels"
              + (f"; failed: {', '.join(failed)}" if failed else "") + f". On the GPU: {Path(__file__).name} "
              f"--from {args.prepare}")
        return 1 if failed else 0
    from moec.runtime.session import cuda_available
    if not cuda_available():
        print("error: no CUDA GPU visible to TVM here (no driver or device); run tools/gpu_check.sh on a GPU "
              "machine, or --dry-run", file=sys.stderr)
        return 2
    folder = args.prepared
    if folder is None:
        folder = args.out
        spec = prepare(args, plans, folder)
    rows = run_gpu(spec, folder, args, started)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n## moec GPU check, {date}: {info.get('name', '?')} ({args.arch}, driver {info.get('driver', '?')})\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"date": date, "gpu": info, "arch": args.arch, "rows": rows}, indent=1))
    bad = [r["plan"] for r in rows if r.get("note", "").startswith(("failed", "skipped")) or r.get("tokens = CPU", "yes") != "yes" or r.get("switch = CPU", "yes") != "yes"]
    return 1 if bad else 0


def _line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:160]


if __name__ == "__main__":
    sys.exit(main())
