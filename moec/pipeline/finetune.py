"""The finetune stage from files: checkpoint + calibration text + plan → fine-tuned checkpoint (+ learned quantization)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from moec.core.errors import MoecError
from moec.core.plan import UNIFORM_METHOD, resolve_plan
from moec.finetune.trainer import FinetuneOptions, FinetuneResult, finetune_model
from moec.finetune.blockwise import finetune_blockwise
from moec.finetune.writer import check_finetune_out, staged_checkpoint, write_checkpoint, write_record
from moec.models.checkpoint import ShardedWriter, load_checkpoint
from moec.models.tokenizer import load_tokenizer
from moec.pipeline.profile import DataConfig, memory_plan_of
from moec.profile.stats import ExpertStats
from moec.quant.padding import padded_widths

#: Centre plan of ``--shift-robust`` without ``--plan``: experts drawn from every allowed width around it.
SHIFT_ROBUST_CENTRE = "uniform:4"


@dataclass
class FinetuneConfig:
    """Inputs of ``moec finetune``."""

    checkpoint: str | os.PathLike
    data: DataConfig
    out: str | os.PathLike
    plan: str | os.PathLike | None = None
    shift_robust: bool = False
    group_size: int = 64
    options: FinetuneOptions = field(default_factory=FinetuneOptions)
    force: bool = False
    #: A ``moec profile`` JSON: with ``shift_robust``, experts' widths are drawn weighted by their
    #: routing frequency (busy experts shifted less and upwards; ``BitSampler``).
    profile: str | os.PathLike | None = None
    #: Train one decoder layer at a time against the float layer's outputs (``moec.finetune.blockwise``).
    blockwise: bool = False


def routing_frequency(profile: str | os.PathLike, model_cfg) -> dict[int, list[float]]:
    """``{layer: [routing frequency per expert]}`` of a profile of this model (one-line error otherwise)."""
    stats = ExpertStats.load(profile)
    if stats.model_fingerprint != model_cfg.fingerprint():
        raise MoecError(f"profile '{profile}' is for another model (fingerprint {str(stats.model_fingerprint)[:16]}, "
                        f"this model is {model_cfg.fingerprint()})")
    return {l: stats.frequency(l).tolist() for l in stats.layers}


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Quantization-aware fine-tuning of ``cfg.checkpoint`` written to ``cfg.out`` (see ``moec.finetune``).

    ``--plan P`` trains for P (``uniform:B`` or a plan file); with ``shift_robust`` each step moves
    experts ±1 width step around P; ``shift_robust`` without a plan draws every expert's width
    from the allowed set around :data:`SHIFT_ROBUST_CENTRE`.
    """
    if cfg.plan is None and not cfg.shift_robust:
        raise MoecError("finetune needs --plan P (uniform:B or a plan file) or --shift-robust")
    if cfg.profile is not None and not cfg.shift_robust:
        raise MoecError("--profile weights the shifted widths; it needs --shift-robust")
    cfg.data.check()
    out = check_finetune_out(cfg.out, cfg.checkpoint, cfg.force)
    ckpt, mem = memory_plan_of(cfg.checkpoint, cfg.data.max_memory_gb, "finetune")
    if mem.sequential and not cfg.blockwise:
        raise MoecError("finetune holds the whole model (teacher, student and optimizer state), which exceeds the "
                        "memory budget; pass --blockwise to train one decoder layer at a time")
    if cfg.blockwise and not ckpt.reads_by_layer:
        raise MoecError(f"--blockwise reads the checkpoint layer by layer, which {ckpt.cfg.architecture} "
                        "checkpoints do not support yet; fine-tune it whole")
    if cfg.options.plan_weight and not cfg.shift_robust:
        raise MoecError("--plan-weight adds the plan's own KL to the shifted bits' KL; it needs --shift-robust")
    if cfg.options.plan_weight and cfg.blockwise:
        raise MoecError("--plan-weight applies to whole-model fine-tuning, not --blockwise")
    if cfg.blockwise and cfg.options.save_every:
        raise MoecError("--save-every applies to whole-model fine-tuning; the block-wise mode writes its "
                        "checkpoint once, after the last block")
    model_cfg = ckpt.cfg
    load_tokenizer(cfg.checkpoint)
    plan = resolve_plan(cfg.plan or SHIFT_ROBUST_CENTRE, model_cfg, cfg.group_size, UNIFORM_METHOD)
    if padded_widths(model_cfg, plan):
        raise MoecError(f"group size {plan.group_size} does not divide an MLP width of this model; finetune "
                        "needs whole groups (choose a group size that divides every width)")
    windows = cfg.data.windows(cfg.checkpoint, model_cfg.max_position)
    opts = cfg.options
    if cfg.shift_robust and opts.shift == "plan":
        opts = replace(opts, shift="neighbours" if cfg.plan is not None else "all")
    if cfg.profile is not None:
        opts = replace(opts, frequency=routing_frequency(cfg.profile, model_cfg))
    if opts.init_method not in ("rtn", "mse", "hqq"):
        raise MoecError(f"--init-method must be rtn, mse or hqq, got {opts.init_method!r}")
    tokenizer = Path(cfg.checkpoint) / "tokenizer.json"

    def record(step, result):
        return {"format": "moec-finetune", "mode": "blockwise" if cfg.blockwise else "whole",
                "source": str(cfg.checkpoint), "step": step,
                "plan": plan.to_json(), "shift": opts.shift, "shift_prob": opts.shift_prob, "plan_prob": opts.plan_prob,
                "plan_weight": opts.plan_weight,
                "shift_weights": "routing-frequency" if opts.frequency is not None else "uniform",
                "data": str(cfg.data.path), "seq_len": cfg.data.seq_len, "batch": opts.batch,
                "lr": opts.lr, "scale_lr": opts.scale_lr, "zero_lr": opts.zero_lr,
                "init_method": opts.init_method, "result": result.to_json()}

    if cfg.blockwise:
        with staged_checkpoint(out, tokenizer) as tmp:
            writer = ShardedWriter(tmp, model_cfg, parts=model_cfg.num_layers + 1)
            learned, result = finetune_blockwise(ckpt, plan, windows, opts, writer, mem.hidden_budget)
            writer.finish()
            learned.save(tmp)
            write_record(tmp, record(result.steps, result))
        return result
    ckpt.close()
    model = load_checkpoint(cfg.checkpoint)

    def save(student, step, result):
        write_checkpoint(out, student, tokenizer, record(step, result))

    _, result = finetune_model(model, plan, windows, opts, save)
    return result
