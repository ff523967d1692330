"""End-to-end decode speed and weight memory: moec-TVM vs onnxruntime vs torch eager, per plan.

For each plan (float, uniform INT8, uniform INT4, a mixed plan) the same packed weights are
compiled by moec (TVM bundle), exported to ONNX (onnxruntime, best of accuracy_level 0 and 4)
and, for real checkpoints, run in torch eager on the fake-quantized float model. Each
engine decodes ``--steps`` tokens after a 16-token prompt; the median step time is reported
as tokens/s (and moec's p50/p99 step time in ms), with ratios against uniform INT8 of the same engine and against onnxruntime.

Usage::

    python benchmarks/decode_e2e.py reference/checkpoint [--mixed plan.json] [--large] [--steps 32]
    python benchmarks/decode_e2e.py --deepseek-v2-lite 3     # only the DeepSeek-V2-Lite-shaped model
    python benchmarks/decode_e2e.py --gpt-oss-20b 2          # only the gpt-oss-20b-shaped model

``--large`` adds a random model with OLMoE-like shapes (hidden 2048, 64 experts of width
1024, top-8, 4 layers) whose packed weights are generated directly (they exceed the L3).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moec.export.exporter import export_weights
from moec.export.ort_runner import OrtModel
from moec.quant.weights import ModelWeights, random_weights
from moec.core.targets import load_target
from moec.lower.bundler import build_bundle_from_params
from moec.lower.params import build_params
from moec.models.checkpoint import load_checkpoint
from moec.core.config import MoEConfig
from moec.quant.packed_model import fake_quantize_model
from moec.runtime.session import BundleSession
from moec.core.plan import BitPlan, resolve_plan, uniform_plan

PROMPT = list(range(3, 19))


def _step_times(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times[2:] or times


def _median_step(step, steps: int) -> float:
    return statistics.median(_step_times(step, steps))


def _p99(times: list[float]) -> float:
    return float(np.percentile(times, 99))


def time_tvm(cfg, plan, weights: ModelWeights, tmp: Path, steps: int,
             activations: str) -> tuple[float, float, float]:
    """(median decode step seconds, p99 decode step seconds, prefill seconds per prompt token
    for a 64-token prompt)."""
    params = build_params(cfg, plan, weights.packed, weights.floats)
    bundle = build_bundle_from_params(cfg, plan, params, load_target("host"), tmp / "bundle", None,
                                      activations=activations if plan_is_quantized(plan) else "float32")
    sess = BundleSession(bundle)
    prompt = [3 + i % 97 for i in range(64)]

    def prefill():
        sess.reset()
        sess.prefill(prompt)
    prefill_s = _median_step(prefill, 5) / len(prompt)
    sess.reset()
    for t in PROMPT:
        sess.step(t)
    times = _step_times(lambda: sess.step(5), steps)
    return statistics.median(times), _p99(times), prefill_s


def plan_is_quantized(plan: BitPlan) -> bool:
    """False for the all-float plan (int8 activations apply to quantized weights only)."""
    return any(b != 16 for layer in plan.experts.values() for b in layer.values())


def time_ort(weights: ModelWeights, tmp: Path, steps: int) -> tuple[float, int]:
    best, level_used = float("inf"), 0
    for level in (0, 4):
        out = export_weights(weights, tmp / f"onnx{level}", accuracy_level=level)
        ort = OrtModel(out.out_dir, threads=2, graphs=("prefill", "decode"))
        _, past = ort.prefill(PROMPT)
        t = _median_step(lambda: ort.step(5, past), steps)
        if t < best:
            best, level_used = t, level
    return best, level_used


def time_torch(model, plan, steps: int) -> float:
    m = copy.deepcopy(model)
    fake_quantize_model(m, plan)
    cache = m.new_cache()
    with torch.no_grad():
        m(torch.tensor([PROMPT]), cache)
        base = cache.length

        def step():
            for kv in (cache.keys, cache.values):  # keep the cache length fixed
                for i, t in enumerate(kv):
                    kv[i] = t[:, :, :base]
            m(torch.tensor([[5]]), cache)
        return _median_step(step, steps)


def run(label: str, cfg: MoEConfig, plans: dict[str, BitPlan], weights_for, model, steps: int,
        activations: str) -> None:
    print(f"\n## {label} (moec activations: {activations})\n")
    print("| plan | weight MB | moec-TVM tok/s | onnxruntime tok/s (level) | torch eager tok/s | "
          "TVM / ORT | TVM vs TVM-INT8 | moec-TVM prefill tok/s (64-token prompt) | "
          "moec step p50 ms | moec step p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for name, plan in plans.items():
        weights = weights_for(plan)
        mb = (sum(p.nbytes for p in weights.packed.values()) + sum(a.nbytes for a in weights.floats.values())) / 1e6
        with tempfile.TemporaryDirectory(prefix="moec-bench-") as d:
            tvm_s, tvm_p99, prefill_s = time_tvm(cfg, plan, weights, Path(d), steps, activations)
            ort_s, level = time_ort(weights, Path(d), steps)
        torch_s = time_torch(model, plan, steps) if model is not None else float("nan")
        rows[name] = (mb, tvm_s, ort_s, level, torch_s, prefill_s, tvm_p99)
    int8 = rows.get("uniform INT8", (0, float("nan")))[1]
    for name, (mb, tvm_s, ort_s, level, torch_s, prefill_s, tvm_p99) in rows.items():
        print(f"| {name} | {mb:.1f} | {1 / tvm_s:.1f} | {1 / ort_s:.1f} ({level}) | {1 / torch_s:.1f} | "
              f"{ort_s / tvm_s:.2f}x | {int8 / tvm_s:.2f}x | {1 / prefill_s:.1f} | "
              f"{tvm_s * 1e3:.3f} | {tvm_p99 * 1e3:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="omit to run only the random models")
    ap.add_argument("--mixed", default=None, help="Mixed plan JSON for the checkpoint (default: a frequency-free "
                    "example: half the experts 2-bit, half 4-bit, attention 8-bit)")
    ap.add_argument("--large", action="store_true", help="Also benchmark the OLMoE-shaped random model.")
    ap.add_argument("--large-only", action="store_true", help="Skip the checkpoint; only the large random model.")
    ap.add_argument("--deepseek-v2-lite", type=int, default=0, metavar="LAYERS",
                    help="Also benchmark a random model with DeepSeek-V2-Lite's shapes (MLA, 64 experts × 1408, "
                         "top-6, 2 shared, layer 0 dense) and this many layers.")
    ap.add_argument("--gpt-oss-20b", type=int, default=0, metavar="LAYERS",
                    help="Also benchmark a random model with gpt-oss-20b's shapes (hidden 2880, 32 experts × 2880, "
                         "top-4, 64 q / 8 kv heads × 64, sinks, sliding window 128 on every other layer, biases) "
                         "and this many layers.")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--activations", choices=["float32", "int8"], default="float32",
                    help="moec decode GEMV activations (int8 = like onnxruntime accuracy_level 4).")
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = args.group_size
    if args.checkpoint is None:
        args.large_only = True
        model = None
    else:
        model = load_checkpoint(args.checkpoint)
        cfg = model.cfg
    if not args.large_only:
        mixed = resolve_plan(args.mixed, cfg) if args.mixed else example_mixed(cfg, g)
        plans = {"float16": uniform_plan(cfg, 16, g), "uniform INT8": uniform_plan(cfg, 8, g),
                 "uniform INT4": uniform_plan(cfg, 4, g), "mixed": mixed}
        run(f"{args.checkpoint} ({cfg.num_layers} layers, {cfg.num_experts} experts, top-{cfg.top_k})", cfg, plans,
            lambda p: ModelWeights.from_model(model, p), model, args.steps, args.activations)
    if args.large or (args.large_only and args.checkpoint is not None):
        big = MoEConfig(vocab_size=4096, hidden_size=2048, num_layers=4, num_heads=16, num_kv_heads=16,
                        num_experts=64, top_k=8, expert_intermediate=1024, norm_topk_prob=False)
        run_random("OLMoE-shaped random model (hidden 2048, 64 experts × 1024, top-8, 4 layers)", big, args)
    if args.deepseek_v2_lite:
        ds = deepseek_v2_lite_shaped(args.deepseek_v2_lite)
        run_random(f"DeepSeek-V2-Lite-shaped random model (MLA latent cache 512+64, 64 experts × 1408, top-6, "
                   f"{ds.num_layers} layers)", ds, args)
    if args.gpt_oss_20b:
        go = gpt_oss_20b_shaped(args.gpt_oss_20b)
        run_random(f"gpt-oss-20b-shaped random model (hidden 2880, 32 experts × 2880, top-4, 64/8 heads × 64, "
                   f"sinks, window 128, {go.num_layers} layers)", go, args)


def run_random(label: str, cfg: MoEConfig, args) -> None:
    """INT8, INT4 and the example mixed plan of a random-weight model (packed directly, no float copy)."""
    g = args.group_size
    plans = {"uniform INT8": uniform_plan(cfg, 8, g), "uniform INT4": uniform_plan(cfg, 4, g),
             "mixed": example_mixed(cfg, g)}
    run(label, cfg, plans, lambda p: random_weights(cfg, p), None, args.steps, args.activations)


def deepseek_v2_lite_shaped(layers: int) -> MoEConfig:
    """DeepSeek-V2-Lite's real layer shapes (vocab cut to 4096), YaRN RoPE as released."""
    return MoEConfig(vocab_size=4096, hidden_size=2048, num_layers=layers, num_heads=16, num_kv_heads=16,
                     num_experts=64, top_k=6, expert_intermediate=1408, norm_topk_prob=False, head_dim=192,
                     shared_intermediate=2816, dense_layers=[0], dense_intermediate=10944, attention="mla",
                     kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128, rope_factor=40.0,
                     rope_original_max=4096, architecture="DeepseekV2ForCausalLM")


def gpt_oss_20b_shaped(layers: int) -> MoEConfig:
    """gpt-oss-20b's real layer shapes (vocab cut to 4096): sliding window 128 on even layers, sinks, biases,
    clamped SwiGLU, YaRN RoPE (factor 32, untruncated) as released."""
    return MoEConfig(vocab_size=4096, hidden_size=2880, num_layers=layers, num_heads=64, num_kv_heads=8,
                     num_experts=32, top_k=4, expert_intermediate=2880, norm_topk_prob=False, head_dim=64,
                     attention_bias=True, attention_out_bias=True, attention_sinks=True, sliding_window=128,
                     sliding_layers=list(range(0, layers, 2)), router_scoring="topk_softmax", router_logit_bias=True,
                     expert_bias=True, swiglu_limit=7.0, swiglu_alpha=1.702, rope_theta=150000.0, rope_factor=32.0,
                     rope_original_max=4096, rope_truncate=False,
                     attention_scale=64 ** -0.5 * (0.1 * math.log(32) + 1) ** 2,
                     max_position=131072, rms_eps=1e-5, architecture="GptOssForCausalLM")


def example_mixed(cfg: MoEConfig, group: int) -> BitPlan:
    """Example mixed plan for models without a profile (random weights): experts alternate 2/4-bit, rest 8-bit."""
    experts = {l: {e: (2 if e % 2 else 4) for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    return BitPlan(experts, {"router": 16, "re:.*": 8}, group, "mse", cfg.fingerprint(),
                   {"policy": "example-mixed-2/4"})


if __name__ == "__main__":
    np.random.seed(0)
    main()
