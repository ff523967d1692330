"""Layer-sequential calibration: profiling, proxy sensitivity and evaluation with one decoder layer resident.

As llm-compressor's sequential pipeline and GPTQModel's layer loop do, the calibration windows
are embedded once and their hidden states ``[n, T, H]`` are carried from layer to layer: layer
``i`` is read from the mapped checkpoint, run on every batch (with the routing recorder and
proxy tap attached to its MoE block), and dropped before layer ``i + 1`` is read. Hidden states
above ``hidden_budget`` bytes live in a temporary file (``np.memmap``) instead of memory.

Results equal the whole-model functions (``collect_stats``, ``proxy_sensitivity``,
``evaluate_windows`` under ``fake_quantize_model``): the same float32 operations on the same batches.

The exact sensitivity of a large model takes a **layer-local form**: for layer ``l`` and
expert ``e`` at ``b`` bits it is the relative squared change of layer ``l``'s MoE output over
the held-out tokens (inputs from the float upstream layers) when only expert ``e`` is
quantized, ``Σ_t g_t² ‖E_b(x_t) − E(x_t)‖² / Σ_t ‖y_t‖²`` — the proxy's formula measured on
held-out text, exact for the layer output rather than for the final NLL.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moec.models.lazy import LazyCheckpoint
from moec.models.model import rope_tables
from moec.profile.evaluate import EvalResult
from moec.profile.stats import ExpertStats, LayerStats, RoutingRecorder
from moec.quant.packed_model import pack_weight
from moec.core.plan import BitPlan

LayerHook = Callable[[int, torch.nn.Module], None]


class HiddenStates:
    """Calibration hidden states ``[n, T, H]`` float32: in memory, or in a temporary file above a budget."""

    def __init__(self, shape: tuple[int, int, int], budget_bytes: int | None = None) -> None:
        nbytes = int(np.prod(shape)) * 4
        self.spilled = budget_bytes is not None and nbytes > budget_bytes
        self._tmp = None
        if self.spilled:
            self._tmp = tempfile.NamedTemporaryFile(prefix="moec-hidden-", suffix=".f32")
            self.data = np.memmap(self._tmp.name, np.float32, "w+", shape=shape)
        else:
            self.data = np.empty(shape, np.float32)

    def __len__(self) -> int:
        return self.data.shape[0]

    def get(self, i: int, j: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data[i:j]))

    def put(self, i: int, value: torch.Tensor) -> None:
        self.data[i:i + len(value)] = value.numpy()

    def close(self) -> None:
        if self._tmp is not None:
            del self.data
            self._tmp.close()


@torch.no_grad()
def run_sequential(ckpt: LazyCheckpoint, inputs: torch.Tensor, batch: int = 8, before: LayerHook | None = None,
                   after: LayerHook | None = None, embed_hook: Callable | None = None,
                   hidden_budget: int | None = None, progress: bool = False, desc: str = "layers") -> HiddenStates:
    """Hidden states after the last decoder layer for token ids ``inputs`` [n, T], one layer resident.

    ``before(i, layer)`` runs after layer ``i`` is read (attach observers, fake-quantize),
    ``after(i, layer)`` once every batch went through it; ``embed_hook(weight)`` may replace the
    embedding matrix (fake quantization).
    """
    cfg = ckpt.cfg
    n, t = inputs.shape
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, torch.arange(t))
    hidden = HiddenStates((n, t, cfg.hidden_size), hidden_budget)
    emb = ckpt.tensor("embed.weight")
    if embed_hook is not None:
        emb = embed_hook(emb)
    for i in range(0, n, batch):
        hidden.put(i, F.embedding(inputs[i:i + batch], emb))
    del emb
    ckpt.release()
    for li in tqdm(range(cfg.num_layers), desc=desc, unit="layer", disable=not progress, leave=False):
        layer = ckpt.layer(li)
        if before is not None:
            before(li, layer)
        for i in range(0, n, batch):
            hidden.put(i, layer(hidden.get(i, i + batch), cos, sin, None, li))
        if after is not None:
            after(li, layer)
        del layer
        ckpt.release()
    return hidden


class _Tap:
    """Keeps one MoE layer's routed inputs, slot weights and output norms (for the proxy)."""

    def __init__(self, recorder: RoutingRecorder | None) -> None:
        self.recorder, self.chunks = recorder, []

    def on_moe(self, layer, x, probs, topk_idx, topk_w, contrib_norm, y_norm) -> None:
        if self.recorder is not None:
            self.recorder.on_moe(layer, x, probs, topk_idx, topk_w, contrib_norm, y_norm)
        self.chunks.append((x.detach(), topk_idx, topk_w.detach(), y_norm))


@torch.no_grad()
def profile_sequential(ckpt: LazyCheckpoint, windows: torch.Tensor, batch: int = 8, proxy: tuple | None = None,
                       hidden_budget: int | None = None, progress: bool = False,
                       record: bool = True) -> tuple[ExpertStats, dict[int, np.ndarray]]:
    """Routing statistics (and, with ``proxy=(bits, group_size, method)``, the proxy sensitivity) layer by layer."""
    from moec.profile.sensitivity import layer_proxy

    cfg = ckpt.cfg
    stats = ExpertStats(cfg.fingerprint(), cfg.num_experts, cfg.top_k)
    for layer in cfg.moe_layers:
        stats.layers[layer] = LayerStats.zeros(cfg.num_experts)
    recorder = RoutingRecorder(stats) if record else None
    proxies: dict[int, np.ndarray] = {}
    taps: dict[int, _Tap] = {}

    def before(i: int, layer) -> None:
        if getattr(layer, "is_moe", False):
            if proxy is None:
                layer.mlp.observer = recorder
            else:
                taps[i] = layer.mlp.observer = _Tap(recorder)

    def after(i: int, layer) -> None:
        if i in taps:
            bits, group, method = proxy
            proxies[i] = layer_proxy(layer.mlp, taps.pop(i).chunks, list(bits), group, method)
        if getattr(layer, "is_moe", False):
            layer.mlp.observer = None

    x = windows[:, :-1]
    run_sequential(ckpt, x, batch, before, after, hidden_budget=hidden_budget, progress=progress,
                   desc="profile").close()
    stats.tokens = x.numel()
    return stats, proxies


def _fake(w: torch.Tensor, bits: int, plan: BitPlan) -> torch.Tensor:
    return torch.from_numpy(pack_weight(w, bits, plan.group_size, plan.method).dequantize())


@torch.no_grad()
def fake_quantize_layer(i: int, layer, plan: BitPlan) -> None:
    """Fake-quantize decoder layer ``i`` in place to ``plan`` (what ``fake_quantize_model`` does to that layer,
    the plan's architecture knobs included: router temperature, dropped and merged experts)."""
    from moec.core.inventory import non_expert_weights
    from moec.models.knobs import apply_block_knobs, merged_weight

    params = dict(layer.named_parameters())
    prefix = f"layers.{i}."
    moe = getattr(layer, "is_moe", False)
    if moe and plan.router_temperature != 1.0:  # packed into the router weight before it is stored
        layer.mlp.router.weight.div_(plan.router_temperature)
    for name, _ in non_expert_weights(layer_cfg(layer)):
        if name.startswith(prefix):
            p = params[name[len(prefix):]]
            p.copy_(_fake(p, plan.tensor_bits(name), plan))
    if i in plan.experts:
        for proj in ("w1", "w3", "w2"):
            stack = params[f"mlp.{proj}"]
            for e, bits in plan.experts[i].items():
                if plan.is_stored(i, e):  # dropped and absorbed experts are not stored
                    stack[e].copy_(_fake(merged_weight(stack, plan, i, e), bits, plan))
    if moe:
        apply_block_knobs(layer.mlp, i, plan, scale_router=False)


def layer_cfg(layer):
    return layer.attn.cfg


@torch.no_grad()
def evaluate_sequential(ckpt: LazyCheckpoint, windows: torch.Tensor, plan: BitPlan | None = None, batch: int = 8,
                        hidden_budget: int | None = None, progress: bool = False) -> EvalResult:
    """Perplexity and top-1 accuracy (as ``evaluate_windows``), optionally fake-quantized to ``plan``."""
    cfg = ckpt.cfg
    before = (lambda i, layer: fake_quantize_layer(i, layer, plan)) if plan is not None else None
    embed_hook = (lambda w: _fake(w, plan.tensor_bits("embed.weight"), plan)) if plan is not None else None
    hidden = run_sequential(ckpt, windows[:, :-1], batch, before, embed_hook=embed_hook,
                            hidden_budget=hidden_budget, progress=progress, desc="eval")
    norm_w = ckpt.tensor("norm.weight")
    head = ckpt.tensor("lm_head.weight")
    if plan is not None:
        head = _fake(head, plan.tensor_bits("embed.weight" if cfg.tie_embeddings else "lm_head.weight"), plan)
    nll, correct, count = 0.0, 0, 0
    for i in range(0, len(hidden), batch):
        h = hidden.get(i, i + batch)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.rms_eps)
        logits = (norm_w * h) @ head.T
        target = windows[i:i + batch, 1:]
        nll += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    hidden.close()
    mean = nll / count
    return EvalResult(perplexity=math.exp(mean), top1=correct / count, nll=mean, tokens=count)


def hidden_bytes(ckpt: LazyCheckpoint, windows: torch.Tensor) -> int:
    n, t = windows.shape
    return n * (t - 1) * ckpt.cfg.hidden_size * 4

