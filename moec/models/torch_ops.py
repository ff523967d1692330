"""Torch implementation of :class:`moec.arch.ops.Ops`: the reference backend behind ``MoEModel``.

Activations keep their batch axis (``[B, T, H]``; the MoE block flattens tokens to ``[N, H]``),
heads are ``[B, T, heads, head_dim]`` and the KV cache ``[B, kv_heads, P, head_dim]``. Weight
names resolve to submodules of the module whose block is running, and ``block`` calls the
submodule itself, so module hooks and the routing observer see every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moec.arch.ops import Routing
from moec.core.errors import MoecError


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor,
                inv_freq: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim] for the half-rotation RoPE used by all supported families.

    ``inv_freq`` (``moec.core.config.rope_inv_freq``) overrides the plain ``theta`` frequencies.
    """
    if inv_freq is not None:
        inv_freq = torch.tensor(inv_freq, dtype=torch.float32)
    else:
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


@dataclass
class Positions:
    """RoPE tables of this call's tokens ([T, head_dim]) and the cache they extend (None: no cache)."""

    cos: torch.Tensor
    sin: torch.Tensor
    cache: KVCache | None


class TorchOps:
    """Ops over the parameters of ``module``; ``positions`` is needed only by attention."""

    def __init__(self, module: nn.Module, positions: Positions | None = None) -> None:
        self.module, self.positions = module, positions
        self.observed: tuple[Routing, torch.Tensor | None] | None = None

    def block(self, name: str, fn: Callable[..., Any], cfg, layer: int, x: torch.Tensor) -> torch.Tensor:
        sub = self.module.get_submodule(name)
        if getattr(sub, "block_fn", None) is not fn:
            raise MoecError(f"module '{name}' ({type(sub).__name__}) does not run block {fn.__name__}")
        if sub.uses_positions:
            p = self.positions
            return sub(x, p.cos, p.sin, p.cache, layer)
        return sub(x)

    def output_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def embed(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        return self.module.get_submodule(name)(ids)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        mod = self.module.get_submodule(name)
        return mod(x) if isinstance(mod, nn.Linear) else F.linear(x, mod.weight)  # tied head: the embedding

    def rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.module.get_submodule(name)(x)

    def layer_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.module.get_submodule(name)(x)

    def split_heads(self, x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], heads, head_dim)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, self.positions.cos[:, None], self.positions.sin[:, None])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
               window: int = 0, sinks: str | None = None) -> torch.Tensor:
        b, t = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cache, past = self.positions.cache, 0
        if cache is not None:
            if cache.keys[layer] is not None:
                past = cache.keys[layer].shape[2]
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # causal mask offset by the cached length: query i sees keys <= past + i
        mask = torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril(diagonal=past)
        if window:  # ... and keys > past + i - window
            mask &= ~torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril(diagonal=past - window)
        if sinks is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        else:  # the sink logit joins every row's softmax, then its column is dropped
            scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
            sink = self.module.get_parameter(sinks).view(1, -1, 1, 1).expand(b, -1, t, 1)
            out = F.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1] @ v
        return out.transpose(1, 2).reshape(b, t, -1)

    def slice_last(self, x, start, stop):
        return x[..., start:stop]

    def concat_last(self, a, b):
        return torch.cat([a, b], dim=-1)

    def head_linear(self, x, name):
        return torch.einsum("...hi,hoi->...ho", x, self.module.get_submodule(name).weight)

    def merge_heads(self, x):
        return x.flatten(-2)

    def clamp(self, x, low, high):
        return x.clamp(min=low, max=high)

    def scale(self, x, factor):
        return x * factor

    def add_bias(self, x, name):
        return x + self.module.get_parameter(name)

    def gather_last(self, x, ids):
        return x.gather(-1, ids)

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def div(self, a, b):
        return a / b

    def silu(self, x):
        return F.silu(x)

    def sigmoid(self, x):
        return torch.sigmoid(x)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x.float(), dim=-1)  # router probabilities in float32 whatever the weights

    def topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = x.topk(k, dim=-1)
        return values, indices

    def keep_top_groups(self, x, groups, keep, top):
        g = x.view(*x.shape[:-1], groups, -1)
        best = g.topk(top, dim=-1).values.sum(-1).topk(keep, dim=-1).indices
        kept = torch.zeros(g.shape[:-1], dtype=torch.bool).scatter(-1, best, True)
        return g.masked_fill(~kept[..., None], float("-inf")).view(x.shape)

    def jitter_mask(self, x, ref, eps):
        return x.masked_fill((ref - x) / x.abs().clamp(min=ref) > 2 * eps, float("-inf"))

    def mask_ids(self, x, ids):
        return x.scatter(-1, ids, float("-inf"))

    def sum_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1, keepdim=True)

    def mask_experts(self, logits: torch.Tensor, layer: int) -> torch.Tensor:
        mask = getattr(self.module, "expert_mask", None)  # the MoEBlock's, set by moec.models.knobs
        return logits if mask is None else logits + mask.to(logits.dtype)

    def routed_experts(self, x: torch.Tensor, routing: Routing, layer: int) -> torch.Tensor:
        """Each chosen expert of the running ``MoEBlock`` on the tokens routed to it."""
        y, contrib = self.module.dispatch(x, routing.ids, routing.weights.to(x.dtype))
        self.observed = (routing, contrib)
        return y
