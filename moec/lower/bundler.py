"""Assemble a bundle from packed weights and a plan: build the library, write manifest + files."""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tvm

import moec
from moec.artifact.bundle import write_bundle
from moec.artifact.weights_file import write_arrays
from moec.core.outputs import work_dir
from moec.core.targets import TargetPreset, load_target
from moec.core.errors import MoecError
from moec.core.formats import get_nested_format, get_scale_format
from moec.lower.library import build_module
from moec.lower.backends import backend_for
from moec.lower.gpu_linear import GpuLinearEmitter
from moec.lower.kernel_linear import KernelEmitter, apply_kernel_layout
from moec.lower.kernels.activations import AUTO
from moec.lower.kernels.factory import make_nested_gemv
from moec.lower.linear import LinearEmitter
from moec.lower.params import ModelParams, build_nested_params, build_params
from moec.core.run_plan import plan_widths, storage_plan
from moec.core.config import MoEConfig
from moec.core.plan import BitPlan
from moec.models.checkpoint import load_checkpoint
from moec.models.model import MoEModel
from moec.models.tokenizer import eos_id, load_tokenizer
from moec.quant.cache import QuantCache, cache_from_env
from moec.quant.weights import ModelWeights

StageCallback = Callable[[str, float], None]


def _kernels_kind(emitter: LinearEmitter) -> str:
    """Manifest ``kernels``: scheduled CPU kernels, fused GPU dequantize-GEMVs, or the reference."""
    if isinstance(emitter, KernelEmitter):
        return "scheduled"
    return "gpu-fused" if isinstance(emitter, GpuLinearEmitter) else "reference"


def build_bundle_from_params(cfg: MoEConfig, plan: BitPlan, params: ModelParams, preset: TargetPreset,
                             out: str | os.PathLike, tokenizer_path: str | os.PathLike | None,
                             extra_manifest: dict | None = None, debug_dump: str | os.PathLike | None = None,
                             on_stage: StageCallback | None = None,
                             extra_files: dict[str, str | os.PathLike] | None = None,
                             use_kernels: bool = True, activations: str = AUTO, force: bool = False,
                             sign_key: str | os.PathLike | None = None,
                             weight_files: dict[str, Path] | None = None, plan_bytes: int | None = None) -> Path:
    """Compile already packed ``params`` for ``preset`` and write the bundle directory ``out``.

    ``use_kernels=False`` builds on the reference emitter (plain TE, for tests and comparisons);
    otherwise the preset's backend (``moec.lower.backends``) gives the kernels. ``force`` replaces
    an ``out`` moec did not write; ``sign_key`` signs the manifest (Ed25519). ``weight_files``
    (``weights.bin``/``weights.json`` already streamed by :mod:`moec.lower.stream_build`) means
    ``params`` hold placeholders in the final (kernel) layout and ``plan_bytes`` is the packed
    size; otherwise the arrays of ``params`` are laid out and written here.
    """

    def stage(name: str, t0: float) -> None:
        if on_stage is not None:
            on_stage(name, time.time() - t0)

    backend = backend_for(preset, reference_kernels=not use_kernels)
    require_scale_kernels(plan, preset)
    backend.require_toolchain(preset)
    target = preset.tvm()
    plan_bytes = params.nbytes if plan_bytes is None else plan_bytes  # moec's layout, before kernel re-layout
    if use_kernels:
        emitter = backend.emitter(target, activations)
    elif activations not in ("float32", AUTO):
        raise MoecError(f"activations={activations} needs moec's CPU kernels, not the reference emitter")
    else:
        emitter = LinearEmitter()
    if weight_files is None:
        t0 = time.time()
        n = apply_kernel_layout(params, emitter)
        stage(f"kernel layout ({n} weights)", t0)
    with work_dir("moec-build-") as tmp:
        t0 = time.time()
        lib = Path(tmp) / "lib.so"
        res = build_module(cfg, params, target, backend, lib, preset.cross_compiler, debug_dump, emitter)
        stage("build", t0)
        t0 = time.time()
        flat = params.flat()
        if weight_files is None:
            weight_files = write_arrays(tmp, flat)
        eos = None
        if tokenizer_path is not None:
            eos = eos_id(load_tokenizer(Path(tokenizer_path).parent))
        manifest = {
            "model": {"architecture": cfg.architecture, "fingerprint": cfg.fingerprint(),
                      "config": cfg.to_dict()},
            "plan": {**plan.to_json(), "model_fingerprint": cfg.fingerprint()},  # a bundle's plan is its model's
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
            "backend": backend.manifest(),
            "activations": resolved_activations(emitter),
            **({"cuda": res.cuda} if res.cuda else {}),
            **(extra_manifest or {}),
        }
        files = {"lib.so": lib, **weight_files, **res.extra_files, **(extra_files or {})}
        if tokenizer_path is not None:
            files["tokenizer.json"] = tokenizer_path
        # the weight files are temporaries of this build or of the streaming packer: moved, not copied
        path = write_bundle(out, files, manifest, force=force, sign_key=sign_key, move=tuple(weight_files))
        stage("bundle", t0)
    return path


def require_scale_kernels(plan: BitPlan, preset: TargetPreset) -> None:
    """One-line refusal of a plan whose scale format (``plan.scales``) no kernel of ``preset``'s backend reads."""
    fmt = get_scale_format(plan.scales)
    name = backend_for(preset).name
    if name not in fmt.kernels:
        raise MoecError(f"'{plan.scales}' scales have kernels for the {' and '.join(sorted(fmt.kernels))} backends "
                        f"only, not '{name}' (target '{preset.name}'); compile with --scales fp16")


def resolved_activations(emitter: LinearEmitter) -> str:
    """The activations the bundle's quantized kernels take (``auto`` resolved by the kernel emitter; on CUDA int8
    only if some GEMV's shape took the int8 bodies)."""
    if isinstance(emitter, GpuLinearEmitter):
        return emitter.resolved_activations
    return getattr(emitter, "activations", "float32")  # the reference emitter: float32


def preset_has_nested_kernels(preset: TargetPreset) -> bool:
    """Whether ``preset``'s backend has the nested (run-time width) expert kernels."""
    return backend_for(preset).name in get_nested_format(8).kernels


def require_nested_activations(preset: TargetPreset, storage_bits: int, activations: str) -> None:
    """One-line refusal, before the slow stages, of nested storage with ``activations`` the target's
    nested kernels do not take (int8: x86 with AVX-512 VNNI only; ``auto`` gives the nested experts
    float32 activations where the target has no int8 nested kernel)."""
    if activations == "int8" and backend_for(preset).name != "cuda":  # CUDA: int8 where the bodies take the shape
        make_nested_gemv(storage_bits, 64, 128, 32, 1, 1, preset.tvm(), activations=activations)


def build_bundle(model: MoEModel, plan: BitPlan, preset: TargetPreset, out: str | os.PathLike,
                 tokenizer_path: str | os.PathLike | None, weights: ModelWeights | None = None,
                 nested: int | None = None, **kwargs) -> Path:
    """Quantize and pack ``model`` under ``plan`` in memory (or take its packed ``weights``) and write
    the bundle for ``preset``: the same parameters an ONNX export of ``weights`` imports back to.

    ``nested=B``: every routed expert is packed once at ``B`` bits in nested storage
    (``moec.quant.nested``) and ``plan``'s expert widths become the bundle's run-time plan at
    load (``BundleSession.set_plan`` changes it); ``plan``'s other weights are compiled as usual.
    ``kwargs`` are those of :func:`build_bundle_from_params`.
    """
    if nested is None:
        weights = weights or ModelWeights.from_model(model, plan)
        params = build_params(weights.cfg, plan, weights.packed, weights.floats)
        return build_bundle_from_params(weights.cfg, plan, params, preset, out, tokenizer_path, **kwargs)
    plan_widths(model.cfg, plan, nested)  # the plan at load must be servable: fail before packing
    if not preset_has_nested_kernels(preset):
        raise MoecError(f"nested expert storage has kernels for the "
                        f"{', '.join(sorted(get_nested_format(nested).kernels))} backends only, not target "
                        f"'{preset.name}'")
    storage = storage_plan(plan, nested)
    weights = weights or ModelWeights.from_model(model, storage)
    params = build_nested_params(weights.cfg, plan, weights.packed, weights.floats, nested)
    kwargs["extra_manifest"] = {**(kwargs.get("extra_manifest") or {}), "nested": {"storage_bits": nested}}
    return build_bundle_from_params(weights.cfg, plan, params, preset, out, tokenizer_path, **kwargs)


class PlanBundler:
    """Bundles of one checkpoint under many plans for one target; the checkpoint is loaded once, lazily.

    ``cache`` (default: ``MOEC_QUANT_CACHE``, if set) keeps every quantized weight, so a plan
    re-quantizes only the (expert, bits) pairs no earlier plan had.
    """

    def __init__(self, checkpoint: str | os.PathLike, target: str | os.PathLike | TargetPreset = "host",
                 cache: QuantCache | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.cache = cache if cache is not None else cache_from_env()
        self.preset = target if isinstance(target, TargetPreset) else load_target(target)
        self._model: MoEModel | None = None

    def __call__(self, plan: BitPlan, out: str | os.PathLike) -> Path:
        """Write the bundle of ``plan`` (validated against the model and the target's bits) to ``out``."""
        if self._model is None:
            self._model = load_checkpoint(self.checkpoint)
        plan = plan.copy().validate(self._model.cfg, tuple(self.preset.allowed_bits))
        tok = self.checkpoint / "tokenizer.json"
        return build_bundle(self._model, plan, self.preset, out, tok if tok.is_file() else None,
                            ModelWeights.from_model(self._model, plan, cache=self.cache),
                            extra_manifest={"source": str(self.checkpoint)})
