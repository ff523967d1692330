"""Typed entry points for every pipeline stage; the CLI only parses options and calls these."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from moec.errors import MoecError
from moec.models.checkpoint import load_checkpoint
from moec.models.model import MoEModel
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import read_text, token_windows
from moec.profile.evaluate import EvalResult, evaluate_windows
from moec.profile.routing import collect_stats
from moec.profile.stats import ExpertStats
from moec.quant.accounting import MemoryReport, float32_memory, plan_memory
from moec.quant.packed_model import apply_plan
from moec.search.plan import BitPlan, resolve_plan

log = logging.getLogger("moec")


@dataclass
class DataConfig:
    """Which text to run and how to cut it."""

    path: str | os.PathLike
    seq_len: int = 256
    max_tokens: int | None = None
    batch: int = 8
    max_memory_gb: float | None = None   # host-memory budget: above it, run layer by layer (or fail early)


def _memory(checkpoint, max_memory_gb: float | None, stage: str):
    """(LazyCheckpoint with headers checked, MemoryPlan) of ``checkpoint`` for ``stage``."""
    from moec.memory_budget import memory_plan
    from moec.models.lazy import LazyCheckpoint

    ckpt = LazyCheckpoint(checkpoint)
    return ckpt, memory_plan(ckpt, max_memory_gb, stage)


def load_model_and_windows(checkpoint: str | os.PathLike, data: DataConfig) -> tuple[MoEModel, "object"]:
    text = read_text(data.path)  # check the cheap input first
    model = load_checkpoint(checkpoint)
    tok = load_tokenizer(checkpoint)
    return model, token_windows(tok, text, data.seq_len, data.max_tokens)


@dataclass
class SensitivityConfig:
    """Which sensitivity measurements ``profile`` adds (``kind``: none, proxy, exact or both)."""

    kind: str = "none"
    bits: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 64
    method: str = "rtn"
    heldout: DataConfig | None = None


def profile(checkpoint: str | os.PathLike, data: DataConfig, out: str | os.PathLike | None = None,
            plot: str | os.PathLike | None = None, progress: bool = True,
            sensitivity: SensitivityConfig | None = None) -> ExpertStats:
    """Routing statistics of ``checkpoint`` on ``data`` (+ optional sensitivity), saved to ``out``/``plot``.

    Exact sensitivity runs on ``sensitivity.heldout`` (default: the calibration data).
    """
    sens = sensitivity or SensitivityConfig()
    if sens.kind not in ("none", "proxy", "exact", "both"):
        raise MoecError(f"unknown sensitivity kind '{sens.kind}'; choices: none, proxy, exact, both")
    text = read_text(data.path)
    ckpt, mem = _memory(checkpoint, data.max_memory_gb, "profile")
    if mem.sequential:
        stats = _profile_sequential(ckpt, checkpoint, text, data, sens, mem.hidden_budget, progress)
    else:
        model = load_checkpoint(checkpoint)
        windows = token_windows(load_tokenizer(checkpoint), text, data.seq_len, data.max_tokens)
        stats = collect_stats(model, windows, batch=data.batch, progress=progress)
    stats.data_sha256 = hashlib.sha256(Path(data.path).read_bytes()).hexdigest()
    if sens.kind != "none" and not mem.sequential:
        from moec.profile.sensitivity import Sensitivity, exact_sensitivity, proxy_sensitivity
        result = Sensitivity(list(sens.bits), sens.group_size, sens.method)
        if sens.kind in ("proxy", "both"):
            result.proxy = proxy_sensitivity(model, windows, result.bits, sens.group_size, sens.method,
                                             batch=data.batch, progress=progress)
        if sens.kind in ("exact", "both"):
            held = windows
            if sens.heldout is not None:
                held = token_windows(load_tokenizer(checkpoint), read_text(sens.heldout.path),
                                     sens.heldout.seq_len, sens.heldout.max_tokens)
            result.exact = exact_sensitivity(model, held, result.bits, sens.group_size, sens.method,
                                             progress=progress)
        stats.sensitivity = result.to_json()
    if out is not None:
        stats.save(out)
    if plot is not None:
        from moec.profile.plot import frequency_heatmap
        frequency_heatmap(stats, plot)
    return stats


def _profile_sequential(ckpt, checkpoint, text: str, data: DataConfig, sens: SensitivityConfig,
                        hidden_budget: int, progress: bool) -> ExpertStats:
    """``profile`` one decoder layer at a time; the exact sensitivity takes its layer-local form."""
    from moec.profile.sensitivity import Sensitivity
    from moec.profile.sequential import profile_sequential

    tok = load_tokenizer(checkpoint)
    windows = token_windows(tok, text, data.seq_len, data.max_tokens)
    proxy = (tuple(sens.bits), sens.group_size, sens.method) if sens.kind in ("proxy", "both") else None
    stats, proxies = profile_sequential(ckpt, windows, data.batch, proxy, hidden_budget, progress)
    if sens.kind != "none":
        result = Sensitivity(list(sens.bits), sens.group_size, sens.method, proxy=proxies)
        if sens.kind in ("exact", "both"):
            held = windows
            if sens.heldout is not None:
                held = token_windows(tok, read_text(sens.heldout.path), sens.heldout.seq_len, sens.heldout.max_tokens)
            _, result.exact = profile_sequential(ckpt, held, data.batch, (tuple(sens.bits), sens.group_size, sens.method),
                                                 hidden_budget, progress, record=False)
        stats.sensitivity = {**result.to_json(), "exact_form": "layer-local" if result.exact else None}
    return stats


@dataclass
class PlanEval:
    """Accuracy of a model under a plan, with the plan's exact memory."""

    result: EvalResult
    plan: BitPlan | None
    memory: MemoryReport | None
    float32_bytes: int


def evaluate(checkpoint: str | os.PathLike, data: DataConfig, plan: str | os.PathLike | None = None,
             progress: bool = True) -> PlanEval:
    """Perplexity and top-1 accuracy, under a bit plan (file or ``uniform:B``) if one is given.

    The plan is applied as fake quantization with the same quantizers every back end uses.
    """
    text = read_text(data.path)
    ckpt, mem = _memory(checkpoint, data.max_memory_gb, "eval")
    if mem.sequential:
        from moec.profile.sequential import evaluate_sequential
        from moec.quant.accounting import shape_model
        model = shape_model(ckpt.cfg)
        bit_plan = resolve_plan(plan, ckpt.cfg) if plan is not None else None
        windows = token_windows(load_tokenizer(checkpoint), text, data.seq_len, data.max_tokens)
        res = evaluate_sequential(ckpt, windows, bit_plan, data.batch, mem.hidden_budget, progress)
        return PlanEval(res, bit_plan, plan_memory(model, bit_plan) if bit_plan else None, float32_memory(model))
    model = load_checkpoint(checkpoint)
    bit_plan = resolve_plan(plan, model.cfg) if plan is not None else None
    windows = token_windows(load_tokenizer(checkpoint), text, data.seq_len, data.max_tokens)
    fp32 = float32_memory(model)
    memory = None
    if bit_plan is not None:
        memory = plan_memory(model, bit_plan)
        apply_plan(model, bit_plan)
    res = evaluate_windows(model, windows, batch=data.batch, progress=progress)
    return PlanEval(res, bit_plan, memory, fp32)


def export_onnx(checkpoint: str | os.PathLike, plan: str | os.PathLike, out: str | os.PathLike,
                group_size: int = 64, method: str = "rtn", verify: bool = False, accuracy_level: int = 0,
                max_memory_gb: float | None = None):
    """Export ``checkpoint`` under ``plan`` (file or ``uniform:B``) to ONNX in directory ``out``.

    Writes ``prefill.onnx``, ``decode.onnx``, ``weights.bin``, ``tokenizer.json`` and ``export.json``
    atomically. ``group_size``/``method`` apply to ``uniform:B`` plans. Returns
    ``moec.export.exporter.ExportResult`` (with ``max_abs_diff`` against the fake-quantized torch
    model when ``verify``).
    """
    from moec.export.exporter import export_model
    from moec.export.writer import check_export_target
    from moec.models.checkpoint import load_config

    bit_plan = resolve_plan(plan, load_config(checkpoint), group_size, method)
    check_export_target(out)  # fail before the (slow) load and quantization
    ckpt, mem = _memory(checkpoint, max_memory_gb, "export")
    if mem.sequential:
        if verify:
            raise MoecError("--verify compares against the whole torch model, which exceeds the memory budget; "
                            "drop --verify (the streamed export is checked by onnx.checker)")
        from moec.export.stream_export import export_streaming
        return export_streaming(ckpt, bit_plan, out, Path(checkpoint) / "tokenizer.json", str(checkpoint),
                                accuracy_level)
    model = load_checkpoint(checkpoint)
    return export_model(model, bit_plan, out, tokenizer=Path(checkpoint) / "tokenizer.json",
                        source=str(checkpoint), verify=verify, accuracy_level=accuracy_level)


def inspect_file(path: str | os.PathLike):
    """Inspect an artifact by type: ``.onnx`` -> ``OnnxInspection``; a bundle directory -> its manifest."""
    from moec.export.inspect_onnx import inspect_onnx

    if Path(path).suffix.lower() == ".onnx":
        return inspect_onnx(path)
    if Path(path).is_dir() and (Path(path) / "manifest.json").is_file():
        from moec.artifact.inspect_bundle import inspect_bundle
        return inspect_bundle(path)
    raise MoecError(f"unsupported file '{path}'; expected a .onnx model or a bundle directory")


@dataclass
class CompileConfig:
    """Inputs of ``moec compile``: checkpoint, target, plan (file / ``uniform:B`` / BitPlan / None) and output.

    Without a plan the bit-width search runs (``search`` holds its settings; it needs ``data``
    or ``search.profile``). ``recipe`` (the resolved recipe, if any) is recorded in the manifest.
    """

    checkpoint: str | os.PathLike
    out: str | os.PathLike
    target: str = "host"
    plan: "str | os.PathLike | BitPlan | None" = None
    data: DataConfig | None = None
    group_size: int = 64
    method: str = "mse"
    debug_dump: str | os.PathLike | None = None
    activations: str = "float32"
    search: "object | None" = None   # moec.search.pipeline.SearchConfig
    recipe: dict | None = None
    max_memory_gb: float | None = None   # above it the checkpoint streams layer by layer (or fails early)


def search(cfg) -> "object":
    """``moec search``: a per-expert BitPlan under a memory budget (``moec.search.pipeline.SearchConfig``).

    Returns ``SearchOutcome`` (plan, cost breakdown, visited plans, plots); the caller saves the plan.
    """
    from moec.search.pipeline import search as run
    return run(cfg)


def _search_plan(cfg: CompileConfig, profile_path: Path | None) -> BitPlan:
    from dataclasses import replace

    from moec.search.pipeline import SearchConfig

    scfg = cfg.search or SearchConfig(cfg.checkpoint, cfg.target)
    scfg = replace(scfg, checkpoint=cfg.checkpoint, target=cfg.target,
                   profile=scfg.profile or profile_path, data=scfg.data or cfg.data)
    if scfg.profile is None and scfg.data is None:
        raise MoecError("compile without --plan searches a plan and needs calibration text (--data), a profile "
                        "with sensitivity (--profile) or a recipe; or pass --plan uniform:4")
    return search(scfg).result.plan


def compile_bundle(cfg: CompileConfig, on_stage=None) -> Path:
    """profile (if calibration data is given) → plan (searched when none is given) → export (ONNX) → build (TVM) → bundle.

    ``on_stage(name, seconds)`` is called as each stage finishes.
    """
    import tempfile
    import time

    from moec.export.exporter import export_model
    from moec.hardware.targets import load_target

    preset = load_target(cfg.target)
    preset.require_toolchain()  # before the slow stages, not after them
    ckpt, mem = _memory(cfg.checkpoint, cfg.max_memory_gb, "compile")
    if mem.sequential:
        return _compile_sequential(cfg, ckpt, preset, on_stage)
    t0 = time.time()
    model = load_checkpoint(cfg.checkpoint)
    tok_path = Path(cfg.checkpoint) / "tokenizer.json"
    tok = load_tokenizer(cfg.checkpoint)
    searching = cfg.plan is None
    with tempfile.TemporaryDirectory(prefix="moec-compile-") as tmp:
        extra_files = {}
        profile_path = None
        if cfg.data is not None and not (searching and cfg.search is not None and cfg.search.profile):
            if searching:  # one profiling pass gives the routing stats and the search's proxy sensitivity
                bits = tuple(b for b in preset.allowed_bits if b != 16)
                gs = cfg.search.group_size if cfg.search else cfg.group_size
                meth = cfg.search.method if cfg.search else "rtn"
                stats = profile(cfg.checkpoint, cfg.data, progress=False,
                                sensitivity=SensitivityConfig("proxy", bits, gs, meth))
            else:
                windows = token_windows(tok, read_text(cfg.data.path), cfg.data.seq_len, cfg.data.max_tokens)
                stats = collect_stats(model, windows, batch=cfg.data.batch)
                stats.data_sha256 = hashlib.sha256(Path(cfg.data.path).read_bytes()).hexdigest()
            profile_path = Path(tmp) / "profile.json"
            stats.save(profile_path)
            extra_files["profile.json"] = profile_path
            if on_stage:
                on_stage("profile", time.time() - t0)
        t0 = time.time()
        if searching:
            plan = _search_plan(cfg, profile_path)
            name = f"search {plan.provenance.get('policy')}"
        elif isinstance(cfg.plan, BitPlan):
            plan, name = cfg.plan.copy().validate(model.cfg), str(cfg.plan.provenance.get("policy", "given"))
        else:
            plan = resolve_plan(cfg.plan, model.cfg, cfg.group_size, cfg.method)
            name = str(plan.provenance.get("policy", Path(str(cfg.plan)).name))
        plan.validate(model.cfg, tuple(preset.allowed_bits))
        if on_stage:
            on_stage(f"plan ({name})", time.time() - t0)
        t0 = time.time()
        export_dir = Path(tmp) / "onnx"
        export_model(model, plan, export_dir, tokenizer=tok_path, source=str(cfg.checkpoint))
        if on_stage:
            on_stage("export (ONNX)", time.time() - t0)
        extra = {"recipe": cfg.recipe} if cfg.recipe is not None else None
        return build_from_onnx(export_dir, cfg.out, cfg.target, cfg.debug_dump, on_stage=on_stage,
                               extra_files=extra_files, extra_manifest=extra, activations=cfg.activations)


def _compile_sequential(cfg: CompileConfig, ckpt, preset, on_stage=None) -> Path:
    """``compile_bundle`` for checkpoints over the memory budget: profile, search and pack layer by layer.

    No ONNX round trip: packed weights stream straight into the bundle's ``weights.bin``.
    """
    import tempfile
    import time
    from dataclasses import replace

    from moec.lower.stream_build import compile_streaming

    t0 = time.time()
    searching = cfg.plan is None
    data = replace(cfg.data, max_memory_gb=cfg.max_memory_gb) if cfg.data is not None else None
    scfg = cfg.search
    if scfg is not None and scfg.data is not None:
        scfg = replace(scfg, data=replace(scfg.data, max_memory_gb=cfg.max_memory_gb))
    with tempfile.TemporaryDirectory(prefix="moec-compile-") as tmp:
        extra_files, profile_path = {}, None
        if data is not None and not (searching and cfg.search is not None and cfg.search.profile):
            sens = None
            if searching:
                sens = SensitivityConfig("proxy", tuple(b for b in preset.allowed_bits if b != 16),
                                         cfg.search.group_size if cfg.search else cfg.group_size,
                                         cfg.search.method if cfg.search else "rtn")
            stats = profile(cfg.checkpoint, data, sensitivity=sens)
            profile_path = Path(tmp) / "profile.json"
            stats.save(profile_path)
            extra_files["profile.json"] = profile_path
            if on_stage:
                on_stage("profile (by layer)", time.time() - t0)
        t0 = time.time()
        if searching:
            plan = _search_plan(replace(cfg, data=data, search=scfg), profile_path)
            name = f"search {plan.provenance.get('policy')}"
        elif isinstance(cfg.plan, BitPlan):
            plan, name = cfg.plan.copy().validate(ckpt.cfg), str(cfg.plan.provenance.get("policy", "given"))
        else:
            plan = resolve_plan(cfg.plan, ckpt.cfg, cfg.group_size, cfg.method)
            name = str(plan.provenance.get("policy", Path(str(cfg.plan)).name))
        plan.validate(ckpt.cfg, tuple(preset.allowed_bits))
        if on_stage:
            on_stage(f"plan ({name})", time.time() - t0)
        tok = Path(cfg.checkpoint) / "tokenizer.json"
        calib = None
        if plan.method == "gptq" and data is not None:  # layer-sequential GPTQ needs the calibration windows
            calib = token_windows(load_tokenizer(cfg.checkpoint), read_text(data.path), data.seq_len, data.max_tokens)
        extra = {"source": str(cfg.checkpoint), "streamed": True,
                 **({"recipe": cfg.recipe} if cfg.recipe is not None else {})}
        return compile_streaming(ckpt, plan, preset, cfg.out, tok if tok.is_file() else None, extra,
                                 cfg.debug_dump, on_stage, extra_files, cfg.activations, calib=calib,
                                 batch=data.batch if data is not None else 8)


def build_from_onnx(onnx_path: str | os.PathLike, out: str | os.PathLike, target: str = "host",
                    debug_dump: str | os.PathLike | None = None, on_stage=None,
                    extra_files: dict | None = None, extra_manifest: dict | None = None,
                    activations: str = "float32") -> Path:
    """``moec build``: the last stage alone — a moec ONNX export (file or directory) → bundle.

    ``activations="int8"`` quantizes the activations of quantized decode GEMVs per group to int8
    (faster on CPUs with int8 dot products, ~1e-2 relative error, like onnxruntime's
    accuracy_level 4); the default keeps them float32 (exact against the fake-quant model).
    """
    import time

    from moec.hardware.targets import load_target
    from moec.lower.bundle_build import build_bundle_from_params
    from moec.lower.onnx_import import import_onnx
    from moec.lower.params import build_params

    preset = load_target(target)
    preset.require_toolchain()
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
                                    activations=activations)
