"""Decode-step latency of exported ONNX models in onnxruntime: FP32 vs uniform INT8 / INT4 vs mixed plans.

Two models:

* the reference model (a checkpoint directory; default ``reference/checkpoint``, else ``/tmp/reftest``),
  quantized for real;
* a random model with OLMoE-like MoE shapes (hidden 2048, 64 experts of width 1024, top-8, full
  qk-norm, un-normalised top-k) whose weights far exceed the last-level cache; its packed weights
  are generated directly (random codes/scales), and its FP32 variant runs only if it fits in memory.

Quantized variants run with MatMulNBits ``accuracy_level`` 0 (float32 compute: exact, the export
default) and 4 (int8 activations: onnxruntime's fast CPU kernels); on the big model only 4 unless
``--big-exact``, because level 0 makes onnxruntime dequantize whole 2/8-bit matrices every call.

Each variant is exported with ``moec.export`` into a temporary directory, loaded in an onnxruntime
CPU session (``intra_op_num_threads`` = ``--threads``), and fed its own greedy tokens starting
from an empty cache; the first ``--warmup`` steps are discarded and the median of the next
``--steps`` (``--big-steps``) single-token decode steps is reported, with ratios against FP32 and uniform INT8.

Usage: ``python benchmarks/onnx_decode.py [CHECKPOINT] [--quick] [--steps 50] [--threads 2]``
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moec.cli.table import format_table
from moec.export.exporter import export_weights
from moec.export.ort_runner import OrtModel
from moec.quant.weights import ModelWeights, random_weights
from moec.models.checkpoint import load_checkpoint
from moec.core.config import MoEConfig
from moec.core.plan import BitPlan, uniform_plan

REPO = Path(__file__).resolve().parents[1]


def mixed_plan(cfg: MoEConfig, bits: tuple[int, ...], seed: int = 0, group_size: int = 64) -> BitPlan:
    """Experts get ``bits`` in equal shares (shuffled per layer); attention/embeddings 8-bit, router float."""
    rng = np.random.default_rng(seed)
    experts = {}
    for layer in cfg.moe_layers:
        row = [bits[i % len(bits)] for i in range(cfg.num_experts)]
        rng.shuffle(row)
        experts[layer] = {e: int(b) for e, b in enumerate(row)}
    tensors = {"router": 16, "re:.*": 8}
    name = "mixed-" + "/".join(map(str, bits))
    return BitPlan(experts, tensors, group_size, "rtn", cfg.fingerprint(), {"policy": name})


def variants(cfg: MoEConfig, quick: bool, levels: tuple[int, ...]) -> list[tuple[str, BitPlan | None, int]]:
    """(name, plan or None for FP32, MatMulNBits accuracy_level) of every measured variant."""
    plans = {"INT8": uniform_plan(cfg, 8), "INT4": uniform_plan(cfg, 4), "mixed 2/4/8": mixed_plan(cfg, (2, 4, 4, 8))}
    if not quick:
        plans["mixed 2/3/4/8"] = mixed_plan(cfg, (2, 3, 4, 8))
    out: list[tuple[str, BitPlan | None, int]] = [("FP32", None, 0)]
    for level in levels:
        out += [(name, plan, level) for name, plan in plans.items()]
    return out


def time_decode(export_dir: Path, threads: int, warmup: int, steps: int) -> float:
    """Median milliseconds of one decode step (greedy, from an empty cache)."""
    m = OrtModel(export_dir, threads=threads, graphs=("decode",))
    cfg = m.summary["config"]
    empty = np.zeros((1, cfg["num_kv_heads"], 0, cfg["head_dim"]), np.float32)
    past = [empty] * (2 * cfg["num_layers"])
    token, times = 1, []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits, past = m.step(token, past)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        token = int(logits[0, -1].argmax())
    return statistics.median(times) * 1e3


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def float32_bytes(cfg: MoEConfig) -> int:
    h, i, e = cfg.hidden_size, cfg.expert_intermediate, cfg.num_experts
    attn = (cfg.num_heads + cfg.num_kv_heads) * 2 * cfg.head_dim * h
    return 4 * (cfg.num_layers * (3 * e * h * i + attn + e * h) + 2 * cfg.vocab_size * h)


def bench_model(label: str, cfg: MoEConfig, make, work: Path, args, steps: int,
                levels: tuple[int, ...]) -> list[list]:
    rows, base = [], {}
    for name, plan, level in variants(cfg, args.quick, levels):
        acc = "-" if plan is None else ("fp32 (exact)" if level == 0 else "int8 act.")
        if plan is None and mem_available() < 3 * float32_bytes(cfg):
            logging.warning("%s FP32 skipped: needs ~%.1f GB, %.1f GB available", label,
                            3 * float32_bytes(cfg) / 1e9, mem_available() / 1e9)
            rows.append([label, name, acc, "-", "skipped (memory)", "-", "-"])
            continue
        t0 = time.perf_counter()
        weights = make(plan)
        d = work / f"{label}-{name}-{level}".replace(" ", "_").replace("/", "")
        res = export_weights(weights, d, accuracy_level=level)
        del weights
        gc.collect()
        size = res.files["weights.bin"] / 1e6
        ms = time_decode(d, args.threads, args.warmup, steps)
        shutil.rmtree(d, ignore_errors=True)
        base[(name, level)] = ms
        logging.warning("%s %s (accuracy_level %d): %.2f ms/step (%.0f MB, %.0f s with export)", label, name, level,
                        ms, size, time.perf_counter() - t0)
        rows.append([label, name, acc, round(size, 1), round(ms, 3), level])
    fp32 = base.get(("FP32", 0))
    for r in rows:
        if isinstance(r[4], float):
            int8 = base.get(("INT8", r[5]))
            r[5] = f"{fp32 / r[4]:.2f}x" if fp32 else "-"
            r.append(f"{int8 / r[4]:.2f}x" if int8 and r[1] != "FP32" else "-")
    return rows


def reference_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    ref = REPO / "reference" / "checkpoint"
    return ref if (ref / "model.safetensors").is_file() else Path("/tmp/reftest")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?",
                    help="reference checkpoint (default reference/checkpoint, else /tmp/reftest)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, 2-layer big model, no 3-bit mixed plan")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps, reference model (default 50; quick 20)")
    ap.add_argument("--big-steps", type=int, default=None, help="timed decode steps, big model (default 20; quick 10)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--big-layers", type=int, default=None, help="layers of the OLMoE-like model (default 4; quick 2)")
    ap.add_argument("--skip-big", action="store_true", help="only the reference model")
    ap.add_argument("--big-exact", action="store_true",
                    help="also time accuracy_level 0 on the big model (slow: onnxruntime dequantizes 2/8-bit B per call)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (20 if args.quick else 50)
    args.big_steps = args.big_steps or (10 if args.quick else 20)
    layers = args.big_layers or (2 if args.quick else 4)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="moec-bench-") as tmp:
        work = Path(tmp)
        ref = reference_path(args.checkpoint)
        model = load_checkpoint(ref)
        rows += bench_model("reference", model.cfg, lambda plan: (
            ModelWeights.float32_from_model(model, uniform_plan(model.cfg, 16)) if plan is None
            else ModelWeights.from_model(model, plan)), work, args, args.steps, (0, 4))
        if not args.skip_big:
            big = MoEConfig(vocab_size=4096, hidden_size=2048, num_layers=layers, num_heads=16, num_kv_heads=16,
                            num_experts=64, top_k=8, expert_intermediate=1024, norm_topk_prob=False, qk_norm="full",
                            architecture="OlmoeForCausalLM")
            rows += bench_model(f"olmoe-like-{layers}L", big, lambda plan: (
                random_weights(big, uniform_plan(big, 16), float32=True) if plan is None
                else random_weights(big, plan)), work, args, args.big_steps, (0, 4) if args.big_exact else (4,))
    print(f"\nonnxruntime {ort.__version__} decode step, median of {args.steps} (reference) / {args.big_steps} "
          f"(big model) steps after {args.warmup} warm-up, intra_op threads = {args.threads}, "
          f"reference checkpoint {ref}\n")
    print(format_table(["model", "variant", "MatMulNBits compute", "weights MB", "median ms", "speed-up vs FP32",
                        "vs INT8 (same compute)"], rows, align="lllrrrr"))
    print("\nspeed-up = FP32 (or INT8) median / this median; 'fp32 (exact)' = accuracy_level 0 (matches the "
          "fake-quantized torch model), 'int8 act.' = accuracy_level 4.")


if __name__ == "__main__":
    sys.exit(main())
