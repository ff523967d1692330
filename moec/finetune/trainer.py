"""Quantization-aware fine-tuning: KL distillation from the float model through fake-quantized weights.

Each step draws the experts' bit-widths (:class:`~moec.finetune.bit_sampler.BitSampler`),
fake-quantizes every planned weight with its learnable scales and zeros
(:class:`~moec.finetune.student.QATStudent`), and minimises ``KL(teacher || student)`` of the
next-token distributions on calibration windows (with ``plan_weight`` λ > 0, the weighted mean
``(KL(sampled bits) + λ·KL(plan's bits)) / (1 + λ)``, so the deployed plan gets a gradient on every
batch while the shifted widths are still trained). The float teacher is a frozen copy of the
model as loaded. Checkpoints are written every ``save_every`` steps and at the end; a
non-finite loss stops training with one line, leaving the last good checkpoint in place.
"""

from __future__ import annotations

import copy
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moec.core.errors import MoecError
from moec.core.plan import BitPlan
from moec.finetune.bit_sampler import BitSampler
from moec.finetune.student import QATStudent
from moec.models.model import MoEModel


@dataclass
class FinetuneOptions:
    """Hyper-parameters of :func:`finetune_model` (see ``moec finetune --help``)."""

    steps: int = 200
    batch: int = 4
    lr: float = 5e-5            # float weights (Adam)
    scale_lr: float = 1e-3      # log-scales (relative steps)
    zero_lr: float = 1e-2       # zero points (in levels)
    shift: str = "plan"         # plan | neighbours | all (see BitSampler)
    shift_prob: float = 0.5
    plan_prob: float = 0.0      # share of steps that train the plan itself (see BitSampler)
    #: weight λ of the plan's own KL, added every step to the sampled (shifted) bits' KL:
    #: loss = (KL(sampled) + λ·KL(plan)) / (1 + λ); 0: only the sampled bits
    plan_weight: float = 0.0
    init_method: str = "mse"
    save_every: int = 0         # 0: only at the end
    seed: int = 0
    progress: bool = True
    #: ``{layer: [routing frequency per expert]}``: weight the shifted widths by it (see BitSampler)
    frequency: dict[int, list[float]] | None = None


@dataclass
class FinetuneResult:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    peak_rss_mb: float
    trained: int                # (weight, bits) pairs with learned parameters
    losses: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0    # user + system CPU time of the training loop (wall time inflates on a shared machine)
    loss_name: str = "KL"       # what first_loss / last_loss measure
    blocks: list[dict] = field(default_factory=list)  # block-wise mode: each block's error before / after

    def to_json(self) -> dict:
        out = {"steps": self.steps, "loss": self.loss_name, "first_loss": self.first_loss, "last_loss": self.last_loss,
               "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
               "peak_rss_mb": round(self.peak_rss_mb, 1),
               "trained_weight_bits": self.trained}
        return {**out, "blocks": self.blocks} if self.blocks else out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(teacher) || softmax(student))``."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def check_windows(windows: torch.Tensor, batch: int) -> None:
    """At least one full batch of windows, else one line saying what is missing."""
    if windows.dim() != 2 or len(windows) < batch:
        have = windows.numel() if windows.dim() else 0
        seq = windows.shape[-1] - 1 if windows.dim() == 2 else 0
        raise MoecError(f"training data too short: {have} tokens make {len(windows)} window(s) of {seq} tokens, "
                        f"one batch needs {batch}; give more text or a smaller --batch / --seq-len")


def finetune_model(model: MoEModel, plan: BitPlan, windows: torch.Tensor, opts: FinetuneOptions,
                   save: Callable[[QATStudent, int, FinetuneResult], None] | None = None) -> tuple[QATStudent, FinetuneResult]:
    """Fine-tune ``model`` (in place) for ``plan`` on token ``windows`` ``[n, T + 1]``.

    ``save(student, step, result)`` is called every ``opts.save_every`` steps and after the last.
    Raises MoecError on a non-finite loss or non-finite weights (nothing is saved after that point).
    """
    check_windows(windows, opts.batch)
    if opts.steps < 1:
        raise MoecError(f"--steps must be >= 1, got {opts.steps}")
    if not (math.isfinite(opts.plan_weight) and opts.plan_weight >= 0):
        raise MoecError(f"--plan-weight must be a finite number >= 0, got {opts.plan_weight}")
    torch.manual_seed(opts.seed)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    sampler = BitSampler(plan, opts.shift, opts.shift_prob, seed=opts.seed, frequency=opts.frequency,
                         plan_prob=opts.plan_prob)
    choices = {l: {e: sampler.choices(b) for e, b in ex.items()} for l, ex in plan.experts.items()}
    student = QATStudent(model, plan, choices, opts.init_method)
    model.train()
    optim = torch.optim.Adam([
        {"params": student.weight_parameters(), "lr": opts.lr},
        {"params": student.scale_parameters(), "lr": opts.scale_lr},
        {"params": student.zero_parameters(), "lr": opts.zero_lr}])
    base = [g["lr"] for g in optim.param_groups]
    gen = torch.Generator().manual_seed(opts.seed)
    order: list[int] = []
    result = FinetuneResult(0, math.nan, math.nan, 0.0, 0.0, len(student.quant))
    start, cpu_start, last_saved = time.perf_counter(), cpu_seconds(), None
    # disable=None: the bar only on a terminal (a log or a pipe gets the final summary only)
    bar = tqdm(range(1, opts.steps + 1), desc="finetune", unit="step", disable=None if opts.progress else True,
               leave=False)
    for step in bar:
        if len(order) < opts.batch:
            order = torch.randperm(len(windows), generator=gen).tolist()
        idx, order = order[:opts.batch], order[opts.batch:]
        w = windows[idx]
        with torch.no_grad():
            target = teacher(w[:, :-1])
        loss = kl_loss(student(w[:, :-1], sampler.sample()), target)
        if opts.plan_weight > 0:
            own = kl_loss(student(w[:, :-1], plan.experts), target)
            loss = (loss + opts.plan_weight * own) / (1 + opts.plan_weight)
        value = float(loss.detach())
        if not math.isfinite(value):
            kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
                    else "no checkpoint was written")
            raise MoecError(f"fine-tuning stopped: loss is {value} at step {step}; {kept}")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        frac = step / opts.steps  # cosine decay to 10 %
        for g, lr in zip(optim.param_groups, base):
            g["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        optim.step()
        result.losses.append(value)
        result.steps = step
        if step == 1:
            result.first_loss = value
        result.last_loss = value
        bar.set_postfix(kl=f"{value:.4f}")
        if save is not None and (step == opts.steps or (opts.save_every and step % opts.save_every == 0)):
            if not all(bool(torch.isfinite(p).all()) for p in student.parameters()):
                kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
                        else "no checkpoint was written")
                raise MoecError(f"fine-tuning stopped: weights became non-finite by step {step}; {kept}")
            result.seconds, result.peak_rss_mb = time.perf_counter() - start, peak_rss_mb()
            result.cpu_seconds = cpu_seconds() - cpu_start
            save(student, step, result)
            last_saved = step
    result.seconds, result.peak_rss_mb = time.perf_counter() - start, peak_rss_mb()
    result.cpu_seconds = cpu_seconds() - cpu_start
    model.eval()
    return student, result
