"""Assemble a bundle from packed weights and a plan: build the library, write manifest + files."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import moec
from moec.artifact.bundle import write_bundle
from moec.artifact.weights_file import write_arrays
from moec.hardware.targets import TargetPreset
from moec.errors import MoecError
from moec.lower.build import build_module
from moec.lower.kernel_linear import KernelEmitter, apply_kernel_layout
from moec.lower.params import ModelParams
from moec.lower.schedules import family_module
from moec.models.config import MoEConfig
from moec.search.plan import BitPlan

StageCallback = Callable[[str, float], None]


def kernel_emitter(target, family: str, use_kernels: bool, activations: str = "float32"):
    """The kernel emitter of ``family``: scheduled CPU kernels where the CPU has schedules, fused
    dequantize-GEMVs for the GPU rules on ``cuda``; None for the reference emitter.

    int8 activations need moec's CPU kernels: asking for them where there are none is an error.
    """
    if activations != "float32" and (not use_kernels or family != "cpu"):
        raise MoecError(f"activations={activations} needs moec's CPU kernels (target family {family!r})")
    if not use_kernels:
        return None
    if family == "cuda":
        from moec.lower.gpu_linear import GpuLinearEmitter
        return GpuLinearEmitter()
    if family != "cpu":
        return None
    try:
        family_module(target)
    except MoecError:
        if activations != "float32":
            raise
        return None
    return KernelEmitter(target, activations)


def _kernels_kind(emitter) -> str:
    """Manifest ``kernels``: scheduled CPU kernels, fused GPU dequantize-GEMVs, or the reference."""
    if isinstance(emitter, KernelEmitter):
        return "scheduled"
    return "reference" if emitter is None else "gpu-fused"


def build_bundle_from_params(cfg: MoEConfig, plan: BitPlan, params: ModelParams, preset: TargetPreset,
                             out: str | os.PathLike, tokenizer_path: str | os.PathLike | None,
                             extra_manifest: dict | None = None, debug_dump: str | os.PathLike | None = None,
                             on_stage: StageCallback | None = None,
                             extra_files: dict[str, str | os.PathLike] | None = None,
                             use_kernels: bool = True, activations: str = "float32",
                             weight_files: dict[str, Path] | None = None, plan_bytes: int | None = None) -> Path:
    """Compile already packed ``params`` for ``preset`` and write the bundle directory ``out``.

    ``weight_files`` (``weights.bin``/``weights.json`` already streamed by
    :mod:`moec.lower.stream_build`) means ``params`` hold placeholders in the final (kernel)
    layout and ``plan_bytes`` is the packed size; otherwise the arrays of ``params`` are laid
    out and written here.
    """
    import tvm

    def stage(name: str, t0: float) -> None:
        if on_stage is not None:
            on_stage(name, time.time() - t0)

    preset.require_toolchain()
    target = preset.tvm()
    plan_bytes = params.nbytes if plan_bytes is None else plan_bytes  # moec's layout, before kernel re-layout
    emitter = kernel_emitter(target, preset.family, use_kernels, activations)
    if isinstance(emitter, KernelEmitter) and weight_files is None:
        t0 = time.time()
        n = apply_kernel_layout(params, emitter)
        stage(f"kernel layout ({n} weights)", t0)
    with tempfile.TemporaryDirectory(prefix="moec-build-") as tmp:
        t0 = time.time()
        lib = Path(tmp) / "lib.so"
        res = build_module(cfg, params, target, preset.family, lib, preset.cross_compiler, debug_dump, emitter)
        stage("build", t0)
        t0 = time.time()
        flat = params.flat()
        if weight_files is None:
            weight_files = write_arrays(tmp, flat)
        eos = None
        if tokenizer_path is not None:
            from moec.models.tokenizer import eos_id, load_tokenizer
            eos = eos_id(load_tokenizer(Path(tokenizer_path).parent))
        manifest = {
            "model": {"architecture": cfg.architecture, "fingerprint": cfg.fingerprint(),
                      "config": cfg.to_dict()},
            "plan": plan.to_json(),
            "target": preset.model_dump(),
            "tvm_target": res.target,
            "tvm_version": tvm.__version__,
            "moec_version": moec.__version__,
            "created_by": " ".join(shlex.quote(a) for a in sys.argv),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "entry": {name: name for name in res.entries},
            "params": [name for name, _ in flat],
            "eos_token_id": eos,
            "weight_bytes": plan_bytes,
            "stored_weight_bytes": params.nbytes,
            "kernels": _kernels_kind(emitter),
            "activations": activations,
            **({"cuda": res.cuda} if res.cuda else {}),
            **(extra_manifest or {}),
        }
        files = {"lib.so": lib, **weight_files, **res.extra_files, **(extra_files or {})}
        if tokenizer_path is not None:
            files["tokenizer.json"] = tokenizer_path
        # the weight files are temporaries of this build or of the streaming packer: moved, not copied
        path = write_bundle(out, files, manifest, move=tuple(weight_files))
        stage("bundle", t0)
    return path
