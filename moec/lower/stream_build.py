"""Streaming compile: a lazily read checkpoint packed one decoder layer at a time straight into the bundle.

Each layer's tensors are read (float32) from the mapped shards, quantized and packed under the
plan, re-laid out for the target's kernels and appended to ``weights.bin``; the arrays are then
replaced by zero-byte placeholders of the same shape and dtype, which is all the Relax graph
builders and TVM need. Peak memory is one layer in float32 plus its packed form, whatever the
number of layers.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moec.artifact.weights_file import WEIGHTS_BIN, WEIGHTS_INDEX, WeightsWriter, placeholder
from moec.core.errors import MoecError
from moec.core.targets import TargetPreset
from moec.core.outputs import work_dir
from moec.lower.backends import backend_for
from moec.lower.bundler import build_bundle_from_params, preset_has_nested_kernels
from moec.lower.kernels.activations import AUTO
from moec.lower.params import ModelParams, WeightEntry, _arrays, _stack, nested_entry, nested_entry_name
from moec.models.lazy import LazyCheckpoint
from moec.core.inventory import expert_key, non_expert_weights
from moec.core.plan import BitPlan
from moec.core.run_plan import plan_widths
from moec.quant.cache import QuantCache
from moec.quant.packed_model import GPTQ, pack_weight

log = logging.getLogger("moec.compile")


class StreamingParams:
    """Builds a :class:`ModelParams` whose arrays are written to a weights file as they are added."""

    def __init__(self, writer: WeightsWriter, emitter) -> None:
        self.writer, self.emitter = writer, emitter
        self.params = ModelParams()
        self.packed_bytes = 0  # moec's packed layout (the plan's memory), before kernel re-layout

    def add(self, name: str, entry: WeightEntry) -> None:
        self.packed_bytes += sum(a.nbytes for a in entry.arrays.values())
        self.emitter.relayout(name, entry)
        for key, arr in entry.arrays.items():
            self.writer.append(f"{name}.{key}", arr)
        entry.arrays = {k: placeholder(a.shape, a.dtype) for k, a in entry.arrays.items()}
        self.params.entries[name] = entry


class _Blocks:
    """The one MoE block a Hessian tap looks up (``moe_blocks()`` of a one-layer model)."""

    def __init__(self, layer: int, block) -> None:
        self.blocks = {layer: block}

    def moe_blocks(self) -> dict:
        return self.blocks


def stream_params(ckpt: LazyCheckpoint, plan: BitPlan, writer: WeightsWriter, emitter, progress: bool = True,
                  calib: torch.Tensor | None = None, batch: int = 8, cache: QuantCache | None = None,
                  nested: int | None = None) -> StreamingParams:
    """Pack every weight of ``ckpt`` under ``plan`` layer by layer into ``writer``.

    ``nested=B``: every routed expert is packed at ``B`` bits into one nested stack per layer and
    projection (:func:`moec.lower.params.nested_entry`, the arrays the whole-model path builds) and
    ``plan``'s expert widths become the run-time width tables (written last, as
    :meth:`ModelParams.flat` orders them).

    With ``plan.method == "gptq"``, ``calib`` (token windows ``[n, T+1]``) runs through the float
    layers one at a time (hidden states carried between layers) and each expert is quantized by
    GPTQ with the Hessian of the tokens routed to it, as soon as its layer has seen every batch;
    weights without a Hessian (non-expert, never-routed experts) use round-to-nearest. ``cache`` (a
    :class:`~moec.quant.cache.QuantCache`) skips weights quantized the same way before.
    """
    cfg = ckpt.cfg
    if plan.method == GPTQ and calib is None:
        raise MoecError("method gptq needs calibration text (--data) for its Hessians")
    sp = StreamingParams(writer, emitter)
    shapes = dict(non_expert_weights(cfg))
    floats: dict[str, np.ndarray] = {}

    def pack(name: str, w, bits: int, hessian=None):
        return pack_weight(w, bits, plan.group_size, plan.method, hessian=hessian, cache=cache, scales=plan.scales)

    def dense(name: str, w) -> None:
        pw = pack(name, w, plan.tensor_bits(name))
        sp.add(name, WeightEntry(pw.bits, pw.shape, _arrays(pw), group_size=pw.group_size, scales=pw.scales))

    def pack_layer(i: int, state: dict, hessians: dict) -> None:
        for key in sorted(state):
            name = f"layers.{i}.{key}"
            if name in shapes:
                dense(name, state.pop(key))
            elif state[key].dim() == 1:
                floats[name] = state.pop(key).numpy().copy()  # small; the mapped read is freed
        if i in cfg.moe_layers and nested is not None:
            pws = {proj: [] for proj in ("w1", "w3", "w2")}
            for e in range(cfg.num_experts):  # expert by expert, so w1 and w3 (one Hessian) go back to back
                for proj in pws:
                    pws[proj].append(pack(expert_key(i, e, proj), state[f"mlp.{proj}"][e], nested,
                                          hessians.get(expert_key(i, e, proj))))
            for proj, ws in pws.items():
                sp.add(nested_entry_name(i, proj), nested_entry(ws, nested))
            del pws
        elif i in cfg.moe_layers:
            bits = np.array([plan.experts[i][e] for e in range(cfg.num_experts)], dtype=np.int32)
            remap = np.zeros_like(bits)
            for c in sorted(set(bits.tolist())):
                members = np.flatnonzero(bits == c)
                remap[members] = np.arange(len(members))
                # expert by expert, so w1 and w3 (one Hessian) are quantized back to back
                pws = {proj: [] for proj in ("w1", "w3", "w2")}
                for e in members:
                    for proj in pws:
                        pws[proj].append(pack(expert_key(i, int(e), proj), state[f"mlp.{proj}"][int(e)], int(c),
                                              hessians.get(expert_key(i, int(e), proj))))
                for proj, ws in pws.items():
                    sp.add(f"layers.{i}.experts.b{c}.{proj}", WeightEntry(
                        int(c), ws[0].shape, _stack(ws), stacked=len(members), group_size=ws[0].group_size,
                        scales=ws[0].scales))
                del pws
            sp.params.class_of[i], sp.params.remap[i] = bits, remap

    dense("embed.weight", ckpt.tensor("embed.weight"))
    floats["norm.weight"] = ckpt.tensor("norm.weight").numpy().copy()
    ckpt.release()
    if plan.method == GPTQ:
        from moec.profile.sequential import run_sequential
        from moec.profile.importance import _ExpertInputTap, _sum_outer, finish_hessians

        taps = {}

        def before(i: int, layer) -> None:
            if layer.is_moe:
                taps[i] = layer.mlp.observer = _ExpertInputTap(_Blocks(i, layer.mlp), _sum_outer)

        def after(i: int, layer) -> None:
            tap = taps.pop(i, None)
            if tap is not None:
                layer.mlp.observer = None
            state = {k: v.detach() for k, v in layer.state_dict().items()}
            pack_layer(i, state, finish_hessians(tap) if tap is not None else {})

        run_sequential(ckpt, calib[:, :-1], batch, before, after, progress=progress, desc="calibrate+pack").close()
    else:
        for i in tqdm(range(cfg.num_layers), desc="pack", unit="layer", disable=not progress):
            state = ckpt.layer_state(i)
            pack_layer(i, state, {})
            del state
            ckpt.release()
    if not cfg.tie_embeddings:
        dense("lm_head.weight", ckpt.tensor("lm_head.weight"))
        ckpt.release()
    sp.params.floats = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(floats.items())}
    if nested is not None:
        sp.params.tables = plan_widths(cfg, plan, nested)
    for k, v in [*sp.params.floats.items(), *sp.params.tables.items()]:
        writer.append(k, v)
        sp.packed_bytes += v.nbytes
    return sp


def compile_streaming(ckpt: LazyCheckpoint, plan: BitPlan, preset: TargetPreset, out: str | os.PathLike,
                      tokenizer_path: str | os.PathLike | None, extra_manifest: dict | None = None,
                      debug_dump: str | os.PathLike | None = None, on_stage=None,
                      extra_files: dict | None = None, activations: str = AUTO, progress: bool = True,
                      calib: torch.Tensor | None = None, batch: int = 8, force: bool = False,
                      sign_key: str | os.PathLike | None = None, cache: QuantCache | None = None,
                      nested: int | None = None) -> Path:
    """Pack ``ckpt`` under ``plan`` (validated by the caller) layer by layer and build the bundle ``out``.

    ``calib`` (token windows) is used by GPTQ plans only (see :func:`stream_params`). ``nested=B``: the
    routed experts are stored once at ``B`` bits (nested storage, ``moec compile --nested``) and
    ``plan``'s expert widths are the run-time plan at load, as :func:`moec.lower.bundler.build_bundle`
    does on the whole-model path.
    """
    if nested is not None:
        plan_widths(ckpt.cfg, plan, nested)  # the plan at load must be servable: fail before packing
        if not preset_has_nested_kernels(preset):
            raise MoecError(f"nested expert storage has kernels for the x86 and arm backends only, not target "
                            f"'{preset.name}'")
        extra_manifest = {**(extra_manifest or {}), "nested": {"storage_bits": nested}}
    backend = backend_for(preset)
    backend.require_toolchain(preset)
    emitter = backend.emitter(preset.tvm(), activations)
    parent = Path(out).absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)  # the weights stream next to the bundle, not into /tmp
    except OSError as exc:
        raise MoecError(f"cannot create bundle directory '{parent}': {exc.strerror}") from None
    with work_dir("moec-stream-", parent) as tmp:
        t0 = time.time()
        with WeightsWriter(tmp) as writer:
            sp = stream_params(ckpt, plan, writer, emitter, progress, calib, batch, cache, nested)
            writer.close([n for n, _ in sp.params.flat()])
        if on_stage:
            note = f", cache {cache.hits} hit / {cache.misses} miss" if cache is not None else ""
            on_stage(f"pack ({writer.pos / 1e9:.2f} GB, streamed{note})", time.time() - t0)
        files = {WEIGHTS_BIN: Path(tmp) / WEIGHTS_BIN, WEIGHTS_INDEX: Path(tmp) / WEIGHTS_INDEX}
        return build_bundle_from_params(ckpt.cfg, plan, sp.params, preset, out, tokenizer_path,
                                        extra_manifest=extra_manifest, debug_dump=debug_dump, on_stage=on_stage,
                                        extra_files=extra_files, activations=activations,  # auto resolves alike again
                                        weight_files=files,
                                        plan_bytes=sp.packed_bytes, force=force, sign_key=sign_key)
