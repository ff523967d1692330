"""`moec finetune`: quantization-aware fine-tuning (learned scales/zeros, KL distillation, shift-robust bits)."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import data_config, max_memory_option


@click.command("finetune")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Calibration text (UTF-8).")
@click.option("--plan", default=None, help="Plan to train for: a plan JSON or uniform:B.")
@click.option("--shift-robust", is_flag=True,
              help="Each step moves every expert one width step around the plan (without --plan: any allowed "
                   "width around uniform:4), so shifted plans lose little.")
@click.option("--shift-prob", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With --plan --shift-robust: probability that an expert is shifted in a step.")
@click.option("--plan-prob", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="With --shift-robust: share of steps that train the plan itself, unshifted (with --shift-prob 1 "
                   "the other steps draw whole shifted plans: every expert one step down or up).")
@click.option("--plan-weight", type=click.FloatRange(0), default=0.0, show_default=True,
              help="With --shift-robust: also train the plan itself on every step, loss = (KL(shifted) + W * "
                   "KL(plan)) / (1 + W) (0: only the shifted bits).")
@click.option("--profile", "profile_path", default=None, type=click.Path(dir_okay=False),
              help="With --shift-robust: a moec profile JSON; experts that fire more often are shifted less "
                   "and towards wider widths.")
@click.option("--out", required=True, type=click.Path(), help="Output checkpoint directory.")
@click.option("--steps", type=click.IntRange(1), default=200, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=4, show_default=True, help="Windows per step.")
@click.option("--seq-len", type=click.IntRange(1), default=256, show_default=True)
@click.option("--max-tokens", type=int, default=None, help="Use at most this many tokens of --data.")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="Learning rate of the float weights.")
@click.option("--scale-lr", type=float, default=1e-3, show_default=True, help="Learning rate of the log-scales.")
@click.option("--zero-lr", type=float, default=1e-2, show_default=True, help="Learning rate of the zero points.")
@click.option("--group-size", type=click.IntRange(1, 1 << 16), default=64, show_default=True,
              help="Group size for uniform:B plans.")
@click.option("--init-method", type=click.Choice(["rtn", "mse", "hqq"]), default="mse", show_default=True,
              help="Quantizer the learned scales and zeros start from.")
@click.option("--save-every", type=click.IntRange(0), default=0, show_default=True,
              help="Also write the checkpoint every N steps (0: at the end only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--blockwise", is_flag=True,
              help="Train one decoder layer at a time (read alone from the checkpoint) to reproduce the float "
                   "layer's outputs (MSE), then the head (KL): memory bounded by one layer plus activations.")
@click.option("--force", is_flag=True, help="Replace --out even if moec finetune did not write it.")
@max_memory_option
def finetune_cmd(checkpoint, data, plan, shift_robust, shift_prob, plan_prob, plan_weight, profile_path, out, steps, batch, seq_len, max_tokens, lr,
                 scale_lr, zero_lr, group_size, init_method, save_every, seed, blockwise, force, max_memory_gb):
    """Quantization-aware fine-tuning of CHECKPOINT for a plan: fake quantization with straight-through
    gradients, learnable per-group scales and zeros, KL distillation from the float model. Writes an HF
    checkpoint plus the learned scales/zeros, which eval, export and compile then use exactly."""
    opts = api.FinetuneOptions(steps=steps, batch=batch, lr=lr, scale_lr=scale_lr, zero_lr=zero_lr,
                               shift_prob=shift_prob, plan_prob=plan_prob, plan_weight=plan_weight, init_method=init_method, save_every=save_every, seed=seed)
    res = api.finetune(api.FinetuneConfig(checkpoint, data_config(data, seq_len, max_tokens, batch, max_memory_gb),
                                          out, plan, shift_robust, group_size, opts, force,
                                          profile_path, blockwise))
    loss = "KL" if res.loss_name == "KL" else "rel. error"  # block-wise: mean over layers, before -> after
    click.echo(f"steps       {res.steps}\n{loss:<11} {res.first_loss:.4f} -> {res.last_loss:.4f}\n"
               f"time        {res.seconds:.1f} s (CPU {res.cpu_seconds:.1f} s)\npeak memory {res.peak_rss_mb:.0f} MB (process RSS)\n"
               f"learned     {res.trained} (weight, bits) scale/zero sets\nwrote       {out}")
