"""`moec compile`: checkpoint → (profile) → plan (searched if none is given) → build → bundle, one line per stage."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import activations_option, max_memory_option, output_options
from moec.cli.search_cmd import parse_tensor_bits, search_options
from moec.core.formats import SCALE_FORMATS
from moec.pipeline.recipe import compile_config, load_recipe, resolve


@click.command("compile")
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="Recipe YAML (model, data, budget, α/β/γ, weighting, policy, target); flags override it.")
@click.option("--target", default=None, help="Target preset name or preset YAML path [host].")
@click.option("--plan", default=None, help="Bit plan JSON or uniform:B (default: search one).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--data", default=None, type=click.Path(dir_okay=False),
              help="Calibration text: profile routing (and the search's sensitivity) into the bundle.")
@click.option("--max-tokens", type=int, default=None, help="Calibration tokens to use [16384].")
@click.option("--group-size", type=int, default=None, help="Quantization group size [64].")
@click.option("--method", default=None, help="Quantizer: rtn, mse, hqq [mse for uniform:B as everywhere, rtn for searched plans].")
@search_options
@output_options
@click.option("--debug-dump", type=click.Path(file_okay=False), default=None,
              help="Write the IR after each lowering phase into this directory.")
@activations_option
@click.option("--scales", type=click.Choice(sorted(SCALE_FORMATS)), default=None,
              help="Scale format of the plan's quantized weights: fp16 (one float16 scale per group) or u8 "
                   "(double-quantized: a uint8 code per group times a float16 super-scale per 8 groups; "
                   "with --group-size 32, 4.44 bits per 4-bit weight). Overrides a plan file's. Needs --plan (the search budgets fp16 scales); x86 and arm targets, float32 activations for those weights. [fp16]")
@click.option("--onnx", "onnx_dir", type=click.Path(file_okay=False), default=None,
              help="Also write the ONNX export of the same packed weights here (`moec build` on it gives this bundle).")
@click.option("--quant-cache", type=click.Path(file_okay=False), default=None, envvar="MOEC_QUANT_CACHE",
              help="Directory caching quantized weights by (weight hash, method, bits, group, calibration): "
                   "compiling more plans of one checkpoint re-quantizes nothing already seen. Bounded by "
                   "MOEC_QUANT_CACHE_GB [8]; every entry is checked (sha256) when read. [$MOEC_QUANT_CACHE]")
@click.option("--nested", type=click.Choice(["8", "4"]), default=None,
              help="Store every routed expert once at 8 (or 4) bits as bit-planes, serving 2/3/4(/8) bits per "
                   "expert chosen at run time (BundleSession.set_plan, moec run --plan); the plan's expert widths "
                   "are the plan at load. x86 and arm targets.")
@max_memory_option
def compile_cmd(checkpoint, recipe, target, plan, out, data, max_tokens, group_size, method, budget_mb, policy,
                alpha, beta, gamma, weighting, profile_path, episodes, seed, tensor_bits, force, sign_key,
                debug_dump, activations, scales, onnx_dir, quant_cache, nested, max_memory_gb):
    """Compile CHECKPOINT (or a recipe's model) into a bundle for a target (library + packed weights + manifest)."""
    overrides = {"model": checkpoint, "target": target, "calibration": data, "max_tokens": max_tokens,
                 "group_size": group_size, "budget_mb": budget_mb, "policy": policy, "alpha": alpha,
                 "beta": beta, "gamma": gamma, "weighting": weighting, "profile": profile_path,
                 "episodes": episodes, "seed": seed, "tensor_bits": parse_tensor_bits(tensor_bits)}
    if method is not None:
        overrides["method"] = method
    resolved = resolve(load_recipe(recipe) if recipe else None, overrides)
    cfg = compile_config(resolved, out, plan, debug_dump)
    cfg.activations = activations
    cfg.scales = scales
    cfg.onnx = onnx_dir
    cfg.force, cfg.sign_key = force, sign_key
    cfg.max_memory_gb = max_memory_gb
    cfg.quant_cache = quant_cache
    cfg.nested = int(nested) if nested is not None else None

    def on_stage(name: str, seconds: float) -> None:
        click.echo(f"  ✓ {name:<24} {seconds:6.1f} s")

    path = api.compile_bundle(cfg, on_stage=on_stage)
    click.echo(f"bundle written to {path}")
