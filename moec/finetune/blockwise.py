"""Block-wise quantization-aware fine-tuning (EfficientQAT's block reconstruction), one decoder layer resident.

The calibration windows are embedded once and two hidden-state streams ``[n, T, H]`` are carried from
layer to layer: the float model's and the quantized student's (which starts from the fake-quantized
embedding). For layer ``i``, read alone from the mapped checkpoint (:meth:`LazyCheckpoint.layer`):

1. the float layer maps the float stream to the *target* (in place);
2. the layer's float weights and the learnable scales and zeros of its planned weights
   (:class:`~moec.finetune.student.QATStudent` on the layer, ``prefix="layers.i."``) are trained for
   ``steps`` steps (Adam, cosine decay, per-step expert widths from the same
   :class:`~moec.finetune.bit_sampler.BitSampler` as the whole-model mode) to minimise the mean squared
   error between the fake-quantized layer's output on the *quantized* stream and the target, so a layer
   also corrects the error of the layers before it;
3. the quantized stream advances through the trained layer at the plan's widths, the layer's float
   weights are written as one shard of the output checkpoint, and the layer is freed.

The final norm and LM head are trained last in the same way on ``KL(teacher || student)`` of the logits
(a tied head is not trained). The embedding is not trained: its learned parameters are those of the
initial quantizer. Each block's relative reconstruction error ``Σ‖y_q − y‖² / Σ‖y‖²`` over all windows
at the plan's widths is recorded before and after training. Peak memory is one layer with its Adam
state, the two streams (spilled to temporary files above ``hidden_budget`` bytes) and the head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moec.core.errors import MoecError
from moec.core.plan import BitPlan
from moec.finetune.bit_sampler import BitSampler
from moec.finetune.fake_quant import GroupQuant
from moec.finetune.student import QATStudent
from moec.finetune.trainer import FinetuneOptions, FinetuneResult, check_windows, cpu_seconds, kl_loss, peak_rss_mb
from moec.core.formats import FLOAT_BITS
from moec.models.checkpoint import ShardedWriter
from moec.models.lazy import LazyCheckpoint
from moec.models.learned_quant import LearnedQuant
from moec.models.model import layer_norm, rope_tables
from moec.profile.sequential import HiddenStates


class _Head(nn.Module):
    """The final norm and the LM head, under their canonical names (``norm.weight``, ``lm_head.weight``)."""

    def __init__(self, cfg, norm_weight: torch.Tensor, head_weight: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = layer_norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        with torch.no_grad():
            self.norm.weight.copy_(norm_weight)
            self.lm_head.weight.copy_(head_weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


@dataclass
class _Block:
    """One trained block: its label, the student, the call that runs it on a stream batch, and its loss."""

    label: str
    student: QATStudent
    run: Callable[[torch.Tensor, dict], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rows(stream: HiddenStates, idx: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(stream.data[sorted(idx)]))


def _train(block: _Block, q: HiddenStates, target: Callable[[list[int]], torch.Tensor], sampler: BitSampler,
           widths: Callable[[dict], dict], opts: FinetuneOptions, gen: torch.Generator, bar) -> list[float]:
    """``opts.steps`` Adam steps of ``block`` on batches of the quantized stream against ``target(rows)``."""
    st = block.student
    st.model.train()
    optim = torch.optim.Adam([{"params": st.weight_parameters(), "lr": opts.lr},
                              {"params": st.scale_parameters(), "lr": opts.scale_lr},
                              {"params": st.zero_parameters(), "lr": opts.zero_lr}])
    base = [g["lr"] for g in optim.param_groups]
    order: list[int] = []
    losses = []
    for step in range(1, opts.steps + 1):
        if len(order) < opts.batch:
            order = torch.randperm(len(q), generator=gen).tolist()
        idx, order = sorted(order[:opts.batch]), order[opts.batch:]
        with torch.no_grad():
            y = target(idx)
        loss = block.loss(block.run(_rows(q, idx), widths(sampler.sample())), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise MoecError(f"fine-tuning stopped: loss is {value} at step {step} of {block.label}; "
                            "no checkpoint was written")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        frac = step / opts.steps
        for g, lr in zip(optim.param_groups, base):
            g["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        optim.step()
        losses.append(value)
        bar.update(1)
        bar.set_postfix(block=block.label, loss=f"{value:.4g}")
    st.model.eval()
    return losses


@torch.no_grad()
def _relative_error(run: Callable[[torch.Tensor], torch.Tensor], q: HiddenStates, target: HiddenStates,
                    batch: int) -> float:
    num = den = 0.0
    for i in range(0, len(q), batch):
        y = target.get(i, i + batch)
        num += float(((run(q.get(i, i + batch)) - y) ** 2).sum())
        den += float((y ** 2).sum())
    return num / max(den, 1e-30)


def finetune_blockwise(ckpt: LazyCheckpoint, plan: BitPlan, windows: torch.Tensor, opts: FinetuneOptions,
                       writer: ShardedWriter, hidden_budget: int | None = None) -> tuple[LearnedQuant, FinetuneResult]:
    """Train ``ckpt`` for ``plan`` block by block (see the module docstring); the float weights go to ``writer``
    (one shard per layer, then one for the embedding, final norm and head). Returns the learned quantization
    parameters of every block and the result (``blocks``: each block's relative error before and after)."""
    check_windows(windows, opts.batch)
    if opts.steps < 1:
        raise MoecError(f"--steps must be >= 1, got {opts.steps}")
    torch.manual_seed(opts.seed)
    cfg = ckpt.cfg
    inputs = windows[:, :-1]
    n, t = inputs.shape
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, torch.arange(t))
    sampler = BitSampler(plan, opts.shift, opts.shift_prob, seed=opts.seed, frequency=opts.frequency,
                         plan_prob=opts.plan_prob)
    gen = torch.Generator().manual_seed(opts.seed)
    learned = LearnedQuant(plan.group_size, model_fingerprint=cfg.fingerprint())
    start, cpu_start = time.perf_counter(), cpu_seconds()

    emb = ckpt.tensor("embed.weight")
    emb_bits = plan.tensor_bits("embed.weight")
    q_emb = emb
    if emb_bits != FLOAT_BITS:
        gq = GroupQuant(emb, emb_bits, plan.group_size, opts.init_method)
        learned.params[("embed.weight", emb_bits)] = gq.export()
        with torch.no_grad():
            q_emb = gq(emb)
    else:
        q_emb = emb.half().float()
    fp, q = HiddenStates((n, t, cfg.hidden_size), hidden_budget), HiddenStates((n, t, cfg.hidden_size), hidden_budget)
    for i in range(0, n, opts.batch):
        fp.put(i, F.embedding(inputs[i:i + opts.batch], emb))
        q.put(i, F.embedding(inputs[i:i + opts.batch], q_emb))
    del emb, q_emb
    ckpt.release()

    train_head = not cfg.tie_embeddings
    total = opts.steps * (cfg.num_layers + train_head)
    bar = tqdm(total=total, desc="finetune (block-wise)", unit="step", disable=None if opts.progress else True,
               leave=False)
    records, firsts, lasts = [], [], []
    for li in range(cfg.num_layers):
        layer = ckpt.layer(li)
        with torch.no_grad():  # the target: the float layer on the float stream
            for i in range(0, n, opts.batch):
                fp.put(i, layer(fp.get(i, i + opts.batch), cos, sin, None, li))
        for p in layer.parameters():
            p.requires_grad_(True)
        moe = li in cfg.moe_layers
        choices = {li: {e: sampler.choices(b) for e, b in plan.experts[li].items()}} if moe else {}
        student = QATStudent(layer, plan, choices, opts.init_method, prefix=f"layers.{li}.")
        planned = {li: dict(plan.experts[li])} if moe else {}

        def run(x, bits, student=student, li=li):
            return student.run((x, cos, sin, None, li), bits)

        block = _Block(f"layer {li}", student, run, F.mse_loss)
        before = _relative_error(lambda x: run(x, planned), q, fp, opts.batch)
        losses = _train(block, q, lambda idx: _rows(fp, idx), sampler,
                        lambda bits, li=li, moe=moe: {li: bits[li]} if moe else {}, opts, gen, bar)
        after = _relative_error(lambda x: run(x, planned), q, fp, opts.batch)
        with torch.no_grad():  # the quantized stream through the trained layer at the plan's widths
            for i in range(0, n, opts.batch):
                q.put(i, run(q.get(i, i + opts.batch), planned))
        learned.params.update(student.learned().params)
        writer.write({f"layers.{li}.{k}": v for k, v in layer.state_dict().items()})
        records.append({"block": block.label, "rel_error_before": before, "rel_error_after": after,
                        "first_loss": losses[0], "last_loss": losses[-1]})
        firsts.append(before)
        lasts.append(after)
        del layer, student, block
        ckpt.release()

    ends = {"embed.weight": ckpt.tensor("embed.weight"), "norm.weight": ckpt.tensor("norm.weight")}
    if train_head:
        ends["lm_head.weight"] = ckpt.tensor("lm_head.weight")
        head = _Head(cfg, ends["norm.weight"], ends["lm_head.weight"])
        teacher = _Head(cfg, ends["norm.weight"], ends["lm_head.weight"]).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = QATStudent(head, plan, {}, opts.init_method)
        block = _Block("head", student, lambda x, bits: student.run((x,), bits), kl_loss)

        @torch.no_grad()
        def head_kl() -> float:  # mean over windows of the per-window KL
            total_kl = 0.0
            for i in range(0, n, opts.batch):
                x = q.get(i, i + opts.batch)
                total_kl += float(kl_loss(student.run((x,), {}), teacher(fp.get(i, i + opts.batch)))) * len(x)
            return total_kl / n

        before = head_kl()
        losses = _train(block, q, lambda idx: teacher(_rows(fp, idx)), sampler, lambda bits: {}, opts, gen, bar)
        records.append({"block": "head", "kl_before": before, "kl_after": head_kl(),
                        "first_loss": losses[0], "last_loss": losses[-1]})
        learned.params.update(student.learned().params)
        ends = {**ends, **{k: v.detach() for k, v in head.state_dict().items()}}
    writer.write(ends)
    bar.close()
    fp.close()
    q.close()
    result = FinetuneResult(total, float(np.mean(firsts)), float(np.mean(lasts)), time.perf_counter() - start,
                            peak_rss_mb(), len(learned.params), cpu_seconds=cpu_seconds() - cpu_start,
                            loss_name="layer relative error (mean)", blocks=records)
    return learned, result
