"""MoEModel: moec's canonical torch MoE decoder that every family adapter loads into.

The modules hold the parameters; their ``forward`` runs the shared block definitions of
``moec.arch.blocks`` through the torch ops (``torch_ops.py``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from moec.arch import blocks
from moec.core.config import MoEConfig, rope_inv_freq
from moec.models.torch_ops import KVCache, Positions, TorchOps, apply_rope, rope_tables

__all__ = ["Attention", "DecoderLayer", "HeadLinear", "KVCache", "LatentAttention", "MoEBlock", "MoEModel", "RMSNorm", "RoutingObserver",
           "SwiGLU", "apply_rope", "rope_tables"]


class RoutingObserver(Protocol):
    """Receives what an MoE block did for a batch of tokens (used by profiling)."""

    def on_moe(self, layer: int, x: torch.Tensor, probs: torch.Tensor, topk_idx: torch.Tensor,
               topk_w: torch.Tensor, contrib_norm: torch.Tensor, y_norm: torch.Tensor) -> None:
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def layer_norm(cfg: MoEConfig, dim: int) -> nn.Module:
    """The layer and final norm of :func:`moec.arch.blocks.norm`: RMSNorm, or LayerNorm with bias."""
    return nn.LayerNorm(dim, eps=cfg.rms_eps) if cfg.norm == "layer" else RMSNorm(dim, cfg.rms_eps)


class Attention(nn.Module):
    """Parameters of :func:`moec.arch.blocks.attention`."""

    block_fn, uses_positions = staticmethod(blocks.attention), True

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=cfg.attention_out_bias)
        if cfg.attention_sinks:  # one logit per query head in every softmax denominator (gpt-oss)
            self.sinks = nn.Parameter(torch.zeros(nh))
        if cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(nh * hd, cfg.rms_eps), RMSNorm(nkv * hd, cfg.rms_eps)
        elif cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_eps), RMSNorm(hd, cfg.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        return self.block_fn(TorchOps(self, Positions(cos, sin, cache)), self.cfg, layer, x)


class HeadLinear(nn.Module):
    """A per-head projection weight ``[heads, out, in]`` (read by ``Ops.head_linear``)."""

    def __init__(self, heads: int, out: int, inp: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, out, inp))
        nn.init.normal_(self.weight, std=0.02)


class LatentAttention(nn.Module):
    """Parameters of :func:`moec.arch.blocks.latent_attention` (DeepSeek MLA, absorbed form)."""

    block_fn, uses_positions = staticmethod(blocks.latent_attention), True

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, nh, r = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank
        qd = cfg.qk_nope_dim + cfg.qk_rope_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * qd, bias=False)
        else:
            self.q_proj = nn.Linear(h, nh * qd, bias=False)
        self.kv_a_proj = nn.Linear(h, r + cfg.qk_rope_dim, bias=False)
        self.kv_norm = RMSNorm(r, cfg.rms_eps)
        self.k_up = HeadLinear(nh, r, cfg.qk_nope_dim)
        self.v_up = HeadLinear(nh, cfg.v_head_dim, r)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        return self.block_fn(TorchOps(self, Positions(cos, sin, cache)), self.cfg, layer, x)


class SwiGLU(nn.Module):
    """Parameters of :func:`moec.arch.blocks.swiglu` (dense MLP layers, the shared expert)."""

    block_fn, uses_positions = staticmethod(blocks.swiglu), False

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_fn(TorchOps(self), None, None, x)


class MoEBlock(nn.Module):
    """Parameters of :func:`moec.arch.blocks.moe`: router, top-k experts (stacked weights), optional
    gated shared expert.

    Expert weights are stacked: ``w1``/``w3`` are [E, I, H] and ``w2`` is [E, H, I],
    so a per-expert plan (quantization, export) indexes the first dimension. With
    ``cfg.expert_bias`` their biases ``w1_bias``/``w3_bias`` [E, I] and ``w2_bias`` [E, H] stay float.
    """

    block_fn, uses_positions = staticmethod(blocks.moe), False

    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate
        self.router = nn.Linear(h, e, bias=cfg.router_logit_bias)
        self.w1 = nn.Parameter(torch.empty(e, i, h))
        self.w3 = nn.Parameter(torch.empty(e, i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)
        if cfg.expert_bias:
            self.w1_bias, self.w3_bias = nn.Parameter(torch.zeros(e, i)), nn.Parameter(torch.zeros(e, i))
            self.w2_bias = nn.Parameter(torch.zeros(e, h))
        if cfg.router_bias:  # added to the scores for the choice only (DeepSeek-V3's correction bias)
            self.score_bias = nn.Parameter(torch.zeros(e))
        self.shared = SwiGLU(h, cfg.shared_intermediate) if cfg.shared_intermediate else None
        self.shared_gate = nn.Linear(h, 1, bias=False) if (self.shared is not None and cfg.shared_gate) else None
        self.observer: RoutingObserver | None = None
        #: Additive router-logit mask (``-inf`` for dropped experts, ``moec.models.knobs``); None: all experts.
        self.expert_mask: torch.Tensor | None = None
        #: Expert id -> the expert that serves it (merged pairs, ``moec.models.knobs``); None: itself.
        self.expert_remap: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Softmax router probabilities, top-k indices and (optionally renormalised) weights."""
        r = blocks.router(TorchOps(self), self.cfg, self.layer, x)
        return r.probs, r.ids, r.weights.to(x.dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` (:func:`moec.arch.blocks.expert` on the stacked weights)."""
        gate, up = x @ self.w1[e].T, x @ self.w3[e].T
        if self.cfg.expert_bias:
            gate, up = gate + self.w1_bias[e], up + self.w3_bias[e]
        y = blocks.glu(TorchOps(self), self.cfg, gate, up) @ self.w2[e].T
        return y + self.w2_bias[e] if self.cfg.expert_bias else y

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                 topk_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Routed experts on ``x [N, H]``: the gated sum and, with an observer, each pair's output norm."""
        y = torch.zeros_like(x)
        contrib = torch.zeros(topk_idx.shape, dtype=x.dtype) if self.observer is not None else None
        if self.expert_remap is not None:  # a merged pair's absorbed expert is served by the kept one
            topk_idx = self.expert_remap[topk_idx]
        # Real routing: each expert runs only on the tokens the router sent to it.
        for e in topk_idx.unique().tolist():
            tok, slot = (topk_idx == e).nonzero(as_tuple=True)
            out = self.expert(e, x[tok]) * topk_w[tok, slot, None]
            y.index_add_(0, tok, out)
            if contrib is not None:
                contrib[tok, slot] = out.norm(dim=-1)
        return y, contrib

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        ops = TorchOps(self)
        y = self.block_fn(ops, self.cfg, self.layer, x)
        if self.observer is not None:
            routing, contrib = ops.observed
            self.observer.on_moe(self.layer, x, routing.probs, routing.ids, routing.weights.to(x.dtype),
                                 contrib, y.norm(dim=-1))
        return y.view(shape)


class DecoderLayer(nn.Module):
    """Parameters of :func:`moec.arch.blocks.decoder_layer`."""

    block_fn, uses_positions = staticmethod(blocks.decoder_layer), True

    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = layer_norm(cfg, cfg.hidden_size)
        self.attn = LatentAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.mlp_norm = layer_norm(cfg, cfg.hidden_size)
        self.is_moe = layer not in cfg.dense_layers
        self.mlp = MoEBlock(cfg, layer) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.dense_intermediate)

    def forward(self, x, cos, sin, cache, layer):
        return self.block_fn(TorchOps(self, Positions(cos, sin, cache)), self.cfg, layer, x)


class MoEModel(nn.Module):
    """Canonical MoE causal LM: embed → layers[attention, MoE] → norm → lm_head."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = layer_norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {i: l.mlp for i, l in enumerate(self.layers) if l.is_moe}

    def set_observer(self, observer: RoutingObserver | None) -> None:
        for block in self.moe_blocks().values():
            block.observer = observer

    def new_cache(self) -> KVCache:
        n = self.cfg.num_layers
        return KVCache([None] * n, [None] * n)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, V]; with a cache, positions continue after the cached length."""
        start = cache.length if cache is not None else 0
        t = input_ids.shape[1]
        cos, sin = rope_tables(self.cfg.rope_dim, self.cfg.rope_theta, torch.arange(start, start + t),
                               rope_inv_freq(self.cfg))
        return blocks.causal_lm(TorchOps(self, Positions(cos, sin, cache)), self.cfg, input_ids)

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int,
                        eos_id: int | None = None) -> list[int]:
        """Greedy decoding with a KV cache; returns only the new token ids."""
        cache = self.new_cache()
        logits = self(torch.tensor([prompt_ids]), cache)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
            logits = self(torch.tensor([[nxt]]), cache)
        return out
