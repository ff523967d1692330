"""The compile and build stages: checkpoint → (profile) → plan → packed weights → TVM bundle, in memory.

``compile_bundle`` loads the checkpoint once and packs it once; the Relax graph is built from
those packed weights directly. ``CompileConfig.onnx`` also writes the ONNX export of the same
packed weights (``moec build`` on it gives the same bundle: tests/lower/test_compile_bundle.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from moec.models.knobs import STREAMED_WHY, require_no_knobs
from moec.artifact.signing import load_private_key
from moec.core.errors import MoecError
from moec.core.outputs import check_output_dir, install_signal_cleanup, work_dir
from moec.core.formats import get_nested_format
from moec.core.plan import BitPlan, resolve_plan
from moec.core.run_plan import plan_widths, storage_plan
from moec.core.targets import load_target
from moec.export.exporter import export_weights
from moec.lower.backends import backend_for
from moec.lower.kernels.activations import AUTO
from moec.lower.bundler import (build_bundle, build_bundle_from_params, preset_has_nested_kernels,
                                require_nested_activations, require_scale_kernels)
from moec.lower.onnx_import import import_onnx
from moec.lower.params import build_params
from moec.lower.stream_build import compile_streaming
from moec.models.checkpoint import load_checkpoint
from moec.models.lazy import LazyCheckpoint
from moec.models.tokenizer import load_tokenizer
from moec.pipeline.profile import DataConfig, SensitivityConfig, memory_plan_of, profile
from moec.pipeline.search import SearchConfig, search
from moec.profile.routing import collect_stats
from moec.quant.accounting import shape_model
from moec.quant.cache import QuantCache
from moec.quant.packed_model import GPTQ
from moec.quant.padding import pad_for_groups
from moec.quant.weights import ModelWeights


@dataclass
class CompileConfig:
    """Inputs of ``moec compile``: checkpoint, target, plan (file / ``uniform:B`` / BitPlan / None) and output.

    Without a plan the bit-width search runs (``search`` holds its settings; it needs ``data``
    or ``search.profile``). ``recipe`` (the resolved recipe, if any) is recorded in the manifest.
    ``onnx``: also write the ONNX export of the packed weights into this directory.
    """

    checkpoint: str | os.PathLike
    out: str | os.PathLike
    target: str = "host"
    plan: "str | os.PathLike | BitPlan | None" = None
    data: DataConfig | None = None
    group_size: int = 64
    method: str = "mse"
    debug_dump: str | os.PathLike | None = None
    activations: str = AUTO          # int8 where the target has int8 kernels (moec.lower.kernels.activations)
    search: SearchConfig | None = None
    recipe: dict | None = None
    onnx: str | os.PathLike | None = None
    force: bool = False              # replace an --out directory moec did not write
    sign_key: str | os.PathLike | None = None  # Ed25519 private key: sign the bundle's manifest
    max_memory_gb: float | None = None   # above it the checkpoint streams layer by layer (or fails early)
    quant_cache: str | os.PathLike | None = None  # directory of quantized weights reused across compiles
    nested: int | None = None        # store routed experts once at this width; the plan's widths switch at run time
    scales: str | None = None        # scale format of a given plan (moec.core.formats.SCALE_FORMATS); None: the plan's


def _search_plan(cfg: CompileConfig, profile_path: Path | None, model) -> BitPlan:
    scfg = cfg.search or SearchConfig(cfg.checkpoint, cfg.target)
    scfg = replace(scfg, checkpoint=cfg.checkpoint, target=cfg.target,
                   profile=scfg.profile or profile_path, data=scfg.data or cfg.data)
    if scfg.profile is None and scfg.data is None:
        raise MoecError("compile without --plan searches a plan and needs calibration text (--data), a profile "
                        "with sensitivity (--profile) or a recipe; or pass --plan uniform:4")
    return search(scfg, model=model).result.plan


def _search_sensitivity(cfg: CompileConfig, preset) -> SensitivityConfig:
    """The proxy sensitivity a searched plan needs, measured in the same pass as the routing statistics."""
    return SensitivityConfig("proxy", tuple(b for b in preset.allowed_bits if b != 16),
                             cfg.search.group_size if cfg.search else cfg.group_size,
                             cfg.search.method if cfg.search else "rtn")


def _front_problem(model, plan: BitPlan, preset, profile_path):
    """The search problem the nested plan front is searched on: the profile's sensitivity, the plan's
    non-expert bits and group size; None (the front is then the memory ladder) without a profile
    with sensitivity, or when the profile is for the unpadded model."""
    if profile_path is None:
        return None
    from moec.profile.stats import ExpertStats
    from moec.quant.accounting import plan_memory
    from moec.search.problem import build_problem
    stats = ExpertStats.load(profile_path)
    if not stats.sensitivity or stats.model_fingerprint != model.cfg.fingerprint():
        return None
    norms = plan_memory(model, BitPlan({}, {}, plan.group_size)).kind_total("norms/bias")
    return build_problem(model.cfg, stats, 1.0, preset.allowed_bits, norms, plan.tensors, plan.group_size, plan.method)


def _choose_plan(cfg: CompileConfig, model_cfg, profile_path: Path | None, model,
                 pad_ok: bool) -> tuple[BitPlan, str]:
    """(plan, its name for the stage line): searched when ``cfg.plan`` is None, else given or resolved.

    ``pad_ok``: weights whose width the group size does not divide are allowed (the whole-model
    path pads them; the layer-by-layer path does not).
    """
    if cfg.plan is None:
        if cfg.scales is not None:
            raise MoecError("--scales applies to a given plan (--plan FILE or uniform:B); the search budgets fp16 "
                            "scales: search first, then compile its plan with --scales")
        plan = _search_plan(cfg, profile_path, model)
        return plan, f"search {plan.provenance.get('policy')}"
    if isinstance(cfg.plan, BitPlan):
        if model is None:  # the in-memory path honours the knobs (packed router, expert mask)
            require_no_knobs(cfg.plan, "streamed compile (model over the memory budget)", STREAMED_WHY)
        plan = cfg.plan.copy()
        if cfg.scales is not None:
            plan.scales = cfg.scales
        return plan.validate(model_cfg, pad_ok=pad_ok), str(cfg.plan.provenance.get("policy", "given"))
    plan = resolve_plan(cfg.plan, model_cfg, cfg.group_size, cfg.method, pad_ok=pad_ok, scales=cfg.scales)
    if model is None:
        require_no_knobs(plan, "streamed compile (model over the memory budget)", STREAMED_WHY)
    return plan, str(plan.provenance.get("policy", Path(str(cfg.plan)).name))


def compile_bundle(cfg: CompileConfig, on_stage=None) -> Path:
    """profile (if calibration data is given) → plan (searched when none is given) → pack → build (TVM) → bundle.

    ``on_stage(name, seconds)`` is called as each stage finishes.
    """
    preset = load_target(cfg.target)
    backend_for(preset).require_toolchain(preset)  # before the slow stages, not after them
    _check_outputs(cfg.out, cfg.force, cfg.sign_key)
    if cfg.nested is not None:
        get_nested_format(cfg.nested)
        if not preset_has_nested_kernels(preset):
            raise MoecError(f"--nested needs a backend with nested kernels "
                            f"({', '.join(sorted(get_nested_format(cfg.nested).kernels))}); target "
                            f"'{preset.name}' has none")
        require_nested_activations(preset, cfg.nested, cfg.activations)
        if cfg.onnx is not None:
            raise MoecError("--onnx cannot export a nested bundle's storage (ONNX has no run-time widths); "
                            "drop --onnx or --nested")
    cache = _quant_cache(cfg)  # an unusable cache directory fails before the slow stages
    ckpt, mem = memory_plan_of(cfg.checkpoint, cfg.max_memory_gb, "compile")
    if mem.sequential:
        return _compile_sequential(cfg, ckpt, preset, on_stage, cache)
    t0 = time.time()
    model = load_checkpoint(cfg.checkpoint)
    tok_path = Path(cfg.checkpoint) / "tokenizer.json"
    load_tokenizer(cfg.checkpoint)  # a missing tokenizer fails before the slow stages
    searching = cfg.plan is None
    with work_dir("moec-compile-") as tmp:
        extra_files = {}
        profile_path = None
        if cfg.data is not None and not (searching and cfg.search is not None and cfg.search.profile):
            if searching:  # one profiling pass gives the routing stats and the search's proxy sensitivity
                stats = profile(cfg.checkpoint, cfg.data, progress=False, model=model,
                                sensitivity=_search_sensitivity(cfg, preset))
            else:
                windows, digest = cfg.data.windows_and_digest(cfg.checkpoint, model.cfg.max_position)
                stats = collect_stats(model, windows, batch=cfg.data.batch)
                stats.data_sha256 = digest
            profile_path = Path(tmp) / "profile.json"
            stats.save(profile_path)
            extra_files["profile.json"] = profile_path
            if on_stage:
                on_stage("profile", time.time() - t0)
        t0 = time.time()
        plan, name = _choose_plan(cfg, model.cfg, profile_path, model, pad_ok=True)
        model, plan = pad_for_groups(model, plan)
        plan.validate(model.cfg, tuple(preset.allowed_bits))
        require_scale_kernels(plan, preset)  # before packing
        if cfg.nested is not None and plan.scales != "fp16":
            raise MoecError(f"--nested stores fp16 scales; drop --scales {plan.scales} or --nested")
        if cfg.nested is not None:
            _check_nested_plan(plan, model.cfg, cfg.nested)
        if on_stage:
            on_stage(f"plan ({name})", time.time() - t0)
        t0 = time.time()
        weights = ModelWeights.from_model(model, plan if cfg.nested is None else storage_plan(plan, cfg.nested),
                                          cache=cache)
        if on_stage:
            on_stage("quantize + pack" + _cache_note(cache), time.time() - t0)
        manifest = {"source": str(cfg.checkpoint)}
        if cfg.onnx is not None:
            t0 = time.time()
            export_weights(weights, cfg.onnx, tok_path, source=str(cfg.checkpoint))
            manifest["onnx"] = str(cfg.onnx)
            if on_stage:
                on_stage("export (ONNX)", time.time() - t0)
        if cfg.recipe is not None:
            manifest["recipe"] = cfg.recipe
        if cfg.nested is not None:  # the run-time plans and their modelled cost, for moec run --adapt
            manifest["plan_front"] = _plan_front(cfg, model, plan, preset, profile_path)
        return build_bundle(model, plan, preset, cfg.out, tok_path if tok_path.is_file() else None, weights,
                            extra_manifest=manifest, debug_dump=cfg.debug_dump, on_stage=on_stage,
                            extra_files=extra_files, activations=cfg.activations, force=cfg.force,
                            sign_key=cfg.sign_key, nested=cfg.nested)


def _check_nested_plan(plan: BitPlan, model_cfg, nested: int) -> None:
    """One-line errors for a plan a nested bundle cannot serve at load (both compile paths)."""
    if any(plan.dropped_experts.values()) or any(plan.merged_experts.values()):
        raise MoecError("--nested stores every expert; plans with dropped_experts or merged_experts are "
                        "not supported there (compile without --nested)")
    plan_widths(model_cfg, plan, nested)  # the plan at load must be servable from the storage


def _plan_front(cfg: CompileConfig, model, plan: BitPlan, preset, profile_path: Path | None) -> list[dict]:
    """The manifest's ``plan_front`` of a nested bundle (``model``: the loaded model, or a shape-only one on
    the layer-by-layer path: only its config and tensor shapes are read)."""
    from moec.runtime.adapt import profile_frequencies
    from moec.search.nested_front import nested_front
    freqs = profile_frequencies(profile_path) if profile_path is not None else None
    sens_profile = profile_path if profile_path is not None else (
        cfg.search.profile if cfg.plan is None and cfg.search is not None else None)
    return nested_front(model.cfg, plan, cfg.nested, preset, freqs,
                        problem=_front_problem(model, plan, preset, sens_profile))


def _compile_sequential(cfg: CompileConfig, ckpt: LazyCheckpoint, preset, on_stage=None,
                        cache: QuantCache | None = None) -> Path:
    """``compile_bundle`` for checkpoints over the memory budget: profile, search and pack layer by layer.

    Packed weights stream straight into the bundle's ``weights.bin``; the checkpoint is never whole in memory.
    """
    t0 = time.time()
    searching = cfg.plan is None
    data = replace(cfg.data, max_memory_gb=cfg.max_memory_gb) if cfg.data is not None else None
    scfg = cfg.search
    if scfg is not None and scfg.data is not None:
        scfg = replace(scfg, data=replace(scfg.data, max_memory_gb=cfg.max_memory_gb))
    with work_dir("moec-compile-") as tmp:
        extra_files, profile_path = {}, None
        if data is not None and not (searching and cfg.search is not None and cfg.search.profile):
            stats = profile(cfg.checkpoint, data, sensitivity=_search_sensitivity(cfg, preset) if searching else None)
            profile_path = Path(tmp) / "profile.json"
            stats.save(profile_path)
            extra_files["profile.json"] = profile_path
            if on_stage:
                on_stage("profile (by layer)", time.time() - t0)
        t0 = time.time()
        plan, name = _choose_plan(replace(cfg, data=data, search=scfg), ckpt.cfg, profile_path, None, pad_ok=False)
        plan.validate(ckpt.cfg, tuple(preset.allowed_bits))
        if cfg.nested is not None:
            _check_nested_plan(plan, ckpt.cfg, cfg.nested)
        if on_stage:
            on_stage(f"plan ({name})", time.time() - t0)
        tok = Path(cfg.checkpoint) / "tokenizer.json"
        calib = None
        if plan.method == GPTQ and data is not None:  # layer-sequential GPTQ needs the calibration windows
            calib = data.windows(cfg.checkpoint, ckpt.cfg.max_position)
        extra = {"source": str(cfg.checkpoint), "streamed": True,
                 **({"recipe": cfg.recipe} if cfg.recipe is not None else {})}
        if cfg.nested is not None:  # the same front as the whole-model path, from the config's shapes alone
            extra["plan_front"] = _plan_front(cfg, shape_model(ckpt.cfg), plan, preset, profile_path)
        return compile_streaming(ckpt, plan, preset, cfg.out, tok if tok.is_file() else None, extra,
                                 cfg.debug_dump, on_stage, extra_files, cfg.activations, calib=calib,
                                 batch=data.batch if data is not None else 8, force=cfg.force,
                                 sign_key=cfg.sign_key, cache=cache, nested=cfg.nested)


def _quant_cache(cfg: CompileConfig) -> QuantCache | None:
    return QuantCache(cfg.quant_cache) if cfg.quant_cache is not None else None


def _cache_note(cache: QuantCache | None) -> str:
    return f", cache {cache.hits} hit / {cache.misses} miss" if cache is not None else ""


def _check_outputs(out, force: bool, sign_key) -> None:
    """Fail before any slow stage: ``out`` must be writable by moec and ``sign_key`` a usable key."""
    install_signal_cleanup()
    check_output_dir(out, force)
    if sign_key is not None:
        load_private_key(sign_key)


def build_from_onnx(onnx_path: str | os.PathLike, out: str | os.PathLike, target: str = "host",
                    debug_dump: str | os.PathLike | None = None, on_stage=None,
                    extra_files: dict | None = None, extra_manifest: dict | None = None,
                    activations: str = AUTO, force: bool = False,
                    sign_key: str | os.PathLike | None = None) -> Path:
    """``moec build``: the last stage alone — a moec ONNX export (file or directory) → bundle.

    ``activations``: see :data:`moec.lower.kernels.activations.AUTO` (the default: int8 per group where the
    target has int8 dot-product kernels, float32 elsewhere; ``float32`` is exact against the fake-quant
    model).
    """
    preset = load_target(target)
    backend_for(preset).require_toolchain(preset)
    _check_outputs(out, force, sign_key)
    t0 = time.time()
    cfg, plan, packed, floats = import_onnx(onnx_path)
    plan.validate(cfg, tuple(preset.allowed_bits))
    params = build_params(cfg, plan, packed, floats)
    if on_stage:
        on_stage("import (ONNX → params)", time.time() - t0)
    src = Path(onnx_path)
    tok = (src if src.is_dir() else src.parent) / "tokenizer.json"
    return build_bundle_from_params(cfg, plan, params, preset, out, tok if tok.is_file() else None,
                                    extra_manifest={"source": str(src), **(extra_manifest or {})},
                                    debug_dump=debug_dump, on_stage=on_stage, extra_files=extra_files,
                                    activations=activations, force=force, sign_key=sign_key)
