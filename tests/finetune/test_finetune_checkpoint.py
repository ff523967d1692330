"""moec finetune end to end on a tiny model: the written checkpoint packs to exactly the weights training used."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from moec.core.plan import BitPlan, uniform_plan
from moec.finetune.bit_sampler import BitSampler, neighbours, shifted_plan
from moec.finetune.trainer import FinetuneOptions, finetune_model
from moec.finetune.writer import write_checkpoint
from moec.models.checkpoint import load_checkpoint
from moec.models.learned_quant import LEARNED_QUANT_FILE
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import token_windows
from moec.quant.weights import ModelWeights
from moec.core.inventory import expert_key
from tests.conftest import TEXT, make_tiny_checkpoint

GROUP = 16


def mixed_plan(cfg) -> BitPlan:
    plan = uniform_plan(cfg, 4, GROUP, "mse")
    widths = [2, 3, 4, 8]
    for layer, experts in plan.experts.items():
        for e in experts:
            experts[e] = widths[(layer + e) % 4]
    plan.tensors = {"router": 16, "attention": 4, "re:.*": 8}
    return plan


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    src = root / "src"
    cfg = make_tiny_checkpoint(src, hidden_size=32, expert_intermediate=32)
    model = load_checkpoint(src)
    windows = token_windows(load_tokenizer(src), TEXT, 32)[:8]
    plan = mixed_plan(cfg)
    out = root / "out"
    opts = FinetuneOptions(steps=4, batch=2, shift="neighbours", shift_prob=0.5, lr=1e-3, scale_lr=1e-2,
                           progress=False)
    student, result = finetune_model(model, plan, windows, opts,
                                     lambda st, step, res: write_checkpoint(out, st, src / "tokenizer.json",
                                                                            {"step": step}))
    return src, out, student, plan, result


def _check_packed_equals_training(student, loaded, plan):
    packed = ModelWeights.from_model(loaded, plan).packed
    fake = {k: v.detach() for k, v in student.fake_weights(plan.experts).items()}
    for name, pw in packed.items():
        if ".experts." in name:
            layer, e, proj = name.split(".")[1], int(name.split(".")[4]), name.split(".")[5]
            want = fake[f"layers.{layer}.mlp.{proj}"][e]
        elif name in fake:
            want = fake[name]
        else:  # float (router)
            continue
        assert np.array_equal(pw.dequantize(), want.numpy()), name


def test_finetuned_checkpoint_packs_to_the_training_fake_quant(trained):
    src, out, student, plan, result = trained
    assert result.steps == 4 and np.isfinite(result.last_loss)
    assert (out / LEARNED_QUANT_FILE).is_file() and (out / "config.json").is_file()
    loaded = load_checkpoint(out)
    assert loaded.learned_quant is not None
    _check_packed_equals_training(student, loaded, plan)
    # a shifted plan (every expert one width step away) is covered by the learned parameters too
    shifted = shifted_plan(plan, random.Random(1))
    assert shifted.experts != plan.experts
    _check_packed_equals_training(student, loaded, shifted)


def test_learned_parameters_moved_and_codes_match(trained):
    src, out, student, plan, _ = trained
    loaded = load_checkpoint(out)
    name = expert_key(0, 0, "w1")
    bits = plan.experts[0][0]
    gq = student.group_quant(name, bits)
    w = loaded.layers[0].mlp.w1[0]
    pw = ModelWeights.from_model(loaded, plan).packed[name]
    from moec.quant.pack import unpack
    assert np.array_equal(unpack(pw.packed, bits, w.shape[1]), gq.codes(w))
    init = load_checkpoint(src)
    from moec.quant.quantize import quantize
    ptq = quantize(init.layers[0].mlp.w1[0].detach().numpy(), bits, GROUP, method="mse")
    assert not np.array_equal(pw.scale, ptq.scale)  # the scales were learned, not the PTQ ones


def test_eval_of_finetuned_checkpoint_matches_training_forward(trained):
    src, out, student, plan, _ = trained
    from moec.quant.packed_model import fake_quantize_model
    loaded = fake_quantize_model(load_checkpoint(out), plan)
    ids = token_windows(load_tokenizer(src), TEXT, 32)[:2, :-1]
    with torch.no_grad():
        a = loaded(ids)
        b = student(ids, plan.experts)
    assert torch.allclose(a, b, atol=1e-5)


def test_sampler_moves_experts_one_step_within_allowed():
    plan = BitPlan({0: {0: 2, 1: 4, 2: 8, 3: 16}}, {}, 64)
    s = BitSampler(plan, "neighbours", 1.0, seed=0)
    seen = {e: set() for e in range(4)}
    for _ in range(50):
        for e, b in s.sample()[0].items():
            seen[e].add(b)
    assert seen == {0: {3}, 1: {3, 8}, 2: {4}, 3: {16}}
    assert neighbours(3) == [2, 4] and BitSampler(plan, "plan").sample() == plan.experts


def test_learned_parameters_of_another_shape_are_refused(trained, tmp_path):
    import shutil
    from moec.core.errors import MoecError
    from moec.models.learned_quant import LearnedQuant
    src, out, student, plan, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    lq = student.learned()
    key = next(iter(lq.params))
    scale, zero = lq.params[key]
    lq.params[key] = (scale[:, :1], zero[:, :1])
    lq.save(bad)
    with pytest.raises(MoecError, match="expected"):
        load_checkpoint(bad)
    LearnedQuant(GROUP, dict(student.learned().params), "0123456789abcdef").save(bad)
    with pytest.raises(MoecError, match="another model"):
        load_checkpoint(bad)


def test_finetune_honours_the_plans_knobs(tmp_path):
    """Dropped and merged experts and a router temperature: trained as eval applies them, so the written
    checkpoint evaluates to the training forward; a dropped expert gets no learned parameters."""
    from moec.quant.packed_model import fake_quantize_model

    src = tmp_path / "src"
    cfg = make_tiny_checkpoint(src, hidden_size=32, expert_intermediate=32)
    plan = mixed_plan(cfg)
    plan.router_temperature, plan.dropped_experts, plan.merged_experts = 1.25, {1: [3]}, {0: [(2, 1, 0.3)]}
    plan.validate(cfg)
    windows = token_windows(load_tokenizer(src), TEXT, 32)[:8]
    opts = FinetuneOptions(steps=3, batch=2, lr=1e-3, scale_lr=1e-2, progress=False)
    out = tmp_path / "out"
    student, _ = finetune_model(load_checkpoint(src), plan, windows, opts,
                                lambda st, step, res: write_checkpoint(out, st, src / "tokenizer.json", {"step": step}))
    learned = student.learned().params
    assert not any(name.startswith(("layers.1.mlp.experts.3.", "layers.0.mlp.experts.1.")) for name, _ in learned)
    loaded = fake_quantize_model(load_checkpoint(out), plan)
    ids = windows[:2, :-1]
    with torch.no_grad():
        a, b = loaded(ids), student(ids, plan.experts)
        plain = fake_quantize_model(load_checkpoint(out), mixed_plan(cfg))(ids)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, plain, atol=1e-3)
    bad = mixed_plan(cfg)
    bad.router_temperature, bad.tensors = 1.25, {"router": 4, "re:.*": 8}
    with pytest.raises(Exception, match="needs a float router"):
        finetune_model(load_checkpoint(src), bad, windows, opts)


def test_plan_weight_adds_the_plans_own_kl_every_step(monkeypatch, tmp_path):
    """``plan_weight`` λ: each step's loss is (KL(sampled) + λ·KL(plan)) / (1 + λ), so with every expert shifted on
    every step (shift_prob 1) the plan's own expert widths are trained only when λ > 0."""
    from moec.finetune import trainer
    src_dir = tmp_path
    cfg = make_tiny_checkpoint(src_dir / "src", hidden_size=32, expert_intermediate=32)
    windows = token_windows(load_tokenizer(src_dir / "src"), TEXT, 32)[:4]
    plan = uniform_plan(cfg, 3, GROUP, "mse")
    real, seen = trainer.kl_loss, []

    def recording(s, t):
        loss = real(s, t)
        seen.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(trainer, "kl_loss", recording)
    moved = {}
    for lam in (0.0, 3.0):
        seen.clear()
        opts = FinetuneOptions(steps=2, batch=2, shift="neighbours", shift_prob=1.0, lr=1e-3, scale_lr=1e-2,
                               progress=False, plan_weight=lam)
        student, result = finetune_model(load_checkpoint(src_dir / "src"), plan, windows, opts)
        if lam:
            assert len(seen) == 4 and result.losses[0] == pytest.approx((seen[0] + lam * seen[1]) / (1 + lam), rel=1e-6)
        else:
            assert len(seen) == 2 and result.losses[0] == pytest.approx(seen[0], rel=1e-6)
        init = initial_log_scale(load_checkpoint(src_dir / "src"), expert_key(0, 0, "w1"), 3)
        moved[lam] = not torch.equal(student.group_quant(expert_key(0, 0, "w1"), 3).log_scale.detach(), init)
    assert moved == {0.0: False, 3.0: True}
    with pytest.raises(Exception, match="plan-weight"):
        finetune_model(load_checkpoint(src_dir / "src"), plan, windows,
                       FinetuneOptions(steps=1, batch=2, progress=False, plan_weight=float("nan")))


def initial_log_scale(model, key: str, bits: int) -> torch.Tensor:
    """The initial (PTQ) log-scale of weight ``key`` at ``bits``."""
    from moec.finetune.fake_quant import GroupQuant
    layer, e, proj = int(key.split(".")[1]), int(key.split(".")[4]), key.split(".")[5]
    w = dict(model.named_parameters())[f"layers.{layer}.mlp.{proj}"][e]
    return GroupQuant(w, bits, GROUP, "mse").log_scale.detach()
