"""MoEModel: moec's canonical torch MoE decoder that every family adapter loads into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moec.core.config import MoEConfig


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


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim] for the half-rotation RoPE used by all supported families."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Per-layer key/value tensors [B, kv_heads, T, head_dim] grown by each forward call."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(nh * hd, cfg.rms_eps), RMSNorm(nkv * hd, cfg.rms_eps)
        elif cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_eps), RMSNorm(hd, cfg.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, cfg.num_heads, cfg.head_dim)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        past = 0
        if cache is not None:
            if cache.keys[layer] is not None:
                past = cache.keys[layer].shape[2]
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        rep = cfg.num_heads // cfg.num_kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        # causal mask offset by the cached length: query i sees keys <= past + i
        mask = torch.ones(t, past + t, dtype=torch.bool).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEBlock(nn.Module):
    """Router + top-k experts (stacked weights) + optional gated shared expert.

    Expert weights are stacked: ``w1``/``w3`` are [E, I, H] and ``w2`` is [E, H, I],
    so a per-expert plan (quantization, export) indexes the first dimension.
    """

    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate
        self.router = nn.Linear(h, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, i, h))
        self.w3 = nn.Parameter(torch.empty(e, i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)
        self.shared = SwiGLU(h, cfg.shared_intermediate) if cfg.shared_intermediate else None
        self.shared_gate = nn.Linear(h, 1, bias=False) if (self.shared is not None and cfg.shared_gate) else None
        self.observer: RoutingObserver | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Softmax router probabilities, top-k indices and (optionally renormalised) weights."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        topk_w, topk_idx = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(-1, keepdim=True)
        return probs, topk_idx, topk_w.to(x.dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w1[e].T) * (x @ self.w3[e].T)) @ self.w2[e].T

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs, topk_idx, topk_w = self.route(x)
        y = torch.zeros_like(x)
        observe = self.observer is not None
        contrib = torch.zeros(topk_idx.shape, dtype=x.dtype) if observe else None
        # Real routing: each expert runs only on the tokens the router sent to it.
        for e in topk_idx.unique().tolist():
            tok, slot = (topk_idx == e).nonzero(as_tuple=True)
            out = self.expert(e, x[tok]) * topk_w[tok, slot, None]
            y.index_add_(0, tok, out)
            if observe:
                contrib[tok, slot] = out.norm(dim=-1)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            y = y + s
        if observe:
            self.observer.on_moe(self.layer, x, probs, topk_idx, topk_w, contrib, y.norm(dim=-1))
        return y.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.is_moe = layer not in cfg.dense_layers
        self.mlp = MoEBlock(cfg, layer) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.dense_intermediate)

    def forward(self, x, cos, sin, cache, layer):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class MoEModel(nn.Module):
    """Canonical MoE causal LM: embed → layers[attention, MoE] → norm → lm_head."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
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
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.rope_theta, torch.arange(start, start + t))
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        return self.lm_head(self.norm(x))

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
