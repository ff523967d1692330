"""Width 0 of the sensitivity measures dropping an expert (masked from the router): proxy and exact
against a direct measurement with the plan's ``dropped_experts``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moec.core.errors import MoecError
from moec.core.plan import uniform_plan
from moec.models.checkpoint import load_checkpoint
from moec.models.knobs import apply_knobs
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import token_windows
from moec.profile.sensitivity import exact_sensitivity, proxy_sensitivity


def _setup(ckpt, text_file):
    model = load_checkpoint(ckpt)
    return model, token_windows(load_tokenizer(ckpt), text_file.read_text(), 32)[:6]


def _dropped(model, layer, expert):
    """A copy of ``model`` with a plan's ``dropped_experts = {layer: [expert]}`` applied."""
    plan = uniform_plan(model.cfg, 8)
    plan.dropped_experts = {layer: [expert]}
    return apply_knobs(copy.deepcopy(model), plan)


def test_drop_proxy_is_the_masked_layer_output_change(tiny_checkpoint, text_file):
    model, windows = _setup(tiny_checkpoint, text_file)
    proxy = proxy_sensitivity(model, windows, [0, 2], group_size=32)
    layer, e = 0, 1  # layer 0's MoE input does not depend on the drop: compare its output directly
    block = model.layers[layer].mlp
    inputs = []
    hook = block.register_forward_hook(lambda m, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(windows[:, :-1])
    hook.remove()
    x = torch.cat(inputs)
    masked = _dropped(model, layer, e).layers[layer].mlp
    with torch.no_grad():
        y, y_drop = block(x), masked(x)
    ref = ((y_drop - y).pow(2).sum() / y.pow(2).sum()).item()
    assert proxy[layer][e, 0] == pytest.approx(ref, rel=1e-4)
    assert (proxy[layer][:, 0] > proxy[layer][:, 1]).all()  # dropping hurts more than 2-bit here


def test_drop_exact_equals_direct_measurement(tiny_checkpoint, text_file):
    model, windows = _setup(tiny_checkpoint, text_file)
    exact = exact_sensitivity(model, windows, [0], group_size=32)

    def nll(m):
        with torch.no_grad():
            logits = m(windows[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()

    layer, e = 1, 3
    assert exact[layer][e, 0] == pytest.approx(nll(_dropped(model, layer, e)) - nll(model), abs=1e-5)
    assert model.layers[layer].mlp.expert_mask is None  # restored


def test_drop_width_refused_for_biased_routers(tiny_checkpoint, text_file):
    from dataclasses import replace

    from moec import api
    from moec.models.model import MoEModel

    model = load_checkpoint(tiny_checkpoint)
    biased = MoEModel(replace(model.cfg, router_bias=True))
    with pytest.raises(MoecError, match="remove 0 from --bits"):
        api.profile(tiny_checkpoint, api.DataConfig(text_file, 32, 200, 8), progress=False, model=biased,
                    sensitivity=api.SensitivityConfig("proxy", (0, 2), 32))
