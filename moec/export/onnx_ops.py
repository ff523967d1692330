"""ONNX implementation of :class:`moec.arch.ops.Ops`: emits a decoder block's nodes into a GraphBuilder.

Activations are float32 ``[T, H]`` (batch 1 flattened), heads ``[T, heads, head_dim]``; the KV
cache is ``[1, kv_heads, P, head_dim]``. Each op mirrors the torch op of ``moec.models.torch_ops``
operation for operation, so onnxruntime and torch differ only by float32 rounding.

Routed experts (:meth:`OnnxOps.routed_experts`), identical in the prefill and decode graphs::

    gates  = ScatterElements(0[T,E], ids, weights)   gate of expert e for token t, 0 if not routed
    hits   = ScatterElements(0[T,E], ids, 1)         1 where token t routed to expert e
    routed = ReduceMax(hits, axis 0) > 0             [E] bool: expert e chosen by some token
    cond_0..cond_E-1 = Split(routed)                 one [1] bool per expert
    acc_0  = 0[T, H]
    acc_e+1 = If(cond_e,
                 then: tok = NonZero(hits[:, e]);                      tokens routed to e (grouped)
                       y  = expert_e(Gather(x, tok)) * Gather(gates[:, e], tok)
                       ScatterND(acc_e, tok, y, reduction="add"),
                 else: Identity(acc_e))

An expert's weights are read only inside its then-branch, so a decode step touches exactly the
top-k experts' packed weights (onnxruntime never evaluates the branch not taken), and prefill
runs each expert once on the group of tokens routed to it; the branch body is
``moec.arch.blocks.expert``. Contributions are accumulated in expert order per token, as the
torch model does. Every node of expert ``e``'s branch, and its ``If``, carries
``metadata_props`` ``layer``, ``expert``, ``bits``, ``group_size``. An expert the plan dropped has
no ``If`` and no weights: its router logit is ``-inf`` (:meth:`OnnxOps.mask_experts`). The absorbed expert
of a merged pair has none either: its slots are renamed to the kept expert before the scatters (which
then add, as two slots of a token may name the kept expert).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from onnx import helper

from moec.arch import blocks
from moec.arch.ops import Routing
from moec.export.onnx_graph import FLOAT, GraphBuilder, tensor_info
from moec.export.quantized_matmul import StoredWeight, embedding, linear
from moec.core.config import MoEConfig, rope_inv_freq
from moec.core.plan import BitPlan
from moec.core.inventory import expert_key


@dataclass
class Positions:
    """Per-graph position values shared by every layer."""

    past: str            # int64 scalar: cached length P
    total: str           # int64 scalar: P + T
    cos: str             # float [T, 1, head_dim]
    sin: str
    mask: str | None     # float [T, P + T] additive causal mask, None for single-token decode
    window_mask: str | None = None  # float [T, P + T]: causal and within cfg.sliding_window (decode too)


def positions(gb: GraphBuilder, cfg: MoEConfig, seq_len: str, past: str | None, causal: bool) -> Positions:
    """RoPE tables for positions ``P .. P+T-1`` and (if ``causal``) the additive attention mask.

    ``seq_len`` and ``past`` are int64 scalars (``past`` None means 0). The inverse frequencies
    are ``moec.core.config.rope_inv_freq``, as in ``moec.models.torch_ops.rope_tables``.
    """
    past = past or gb.scalar_i64(0)
    total = gb.op("Add", [past, seq_len])
    inv_freq = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32)
    pos = gb.op("Cast", [gb.op("Range", [past, total, gb.scalar_i64(1)])], to=1)
    freqs = gb.op("Mul", [gb.op("Unsqueeze", [pos, gb.i64(1)]), gb.const(inv_freq.numpy()[None, :])])
    emb = gb.op("Concat", [freqs, freqs], axis=-1)
    cos = gb.op("Unsqueeze", [gb.op("Cos", [emb]), gb.i64(1)])
    sin = gb.op("Unsqueeze", [gb.op("Sin", [emb]), gb.i64(1)])
    mask = window_mask = None
    if causal or cfg.sliding_window:  # query i (absolute P+i) sees keys j <= P+i (and j > P+i-window)
        keys = gb.op("Unsqueeze", [gb.op("Range", [gb.scalar_i64(0), total, gb.scalar_i64(1)]), gb.i64(0)])
        queries = gb.op("Unsqueeze", [gb.op("Range", [past, total, gb.scalar_i64(1)]), gb.i64(1)])
        seen = gb.op("LessOrEqual", [keys, queries])
        if causal:
            mask = gb.op("Where", [seen, gb.f32(0.0), gb.f32(-np.inf)])
        if cfg.sliding_window:
            near = gb.op("Greater", [keys, gb.op("Sub", [queries, gb.i64(cfg.sliding_window)])])
            window_mask = gb.op("Where", [gb.op("And", [seen, near]), gb.f32(0.0), gb.f32(-np.inf)])
    return Positions(past, total, cos, sin, mask, window_mask)


class OnnxOps:
    """Ops on ONNX value names; ``decode`` graphs read the cache from ``past.L.key``/``past.L.value``.

    ``w`` and ``floats`` map canonical weight names to stored weights and float initializers.
    """

    def __init__(self, gb: GraphBuilder, cfg: MoEConfig, w: dict[str, StoredWeight], floats: dict[str, str],
                 pos: Positions | None, decode: bool, plan: BitPlan | None = None) -> None:
        self.gb, self.cfg, self.w, self.floats, self.pos, self.decode = gb, cfg, w, floats, pos, decode
        self.plan = plan  # its dropped experts: masked logits; dropped and merged-away experts: no branch
        self.dropped = plan.dropped_experts if plan is not None else {}
        self.prefix = ""
        self.heads: dict[str, tuple[int, int]] = {}  # value name -> (heads, head_dim) of head-shaped values

    def block(self, name, fn, *args):
        sub = copy.copy(self)
        sub.prefix = f"{self.prefix}{name}."
        if not name.startswith("layers."):
            return fn(sub, *args)
        with self.gb.name_scope(f"L{name.split('.')[1]}"):  # node names L<i>.… (profiles key on them)
            return fn(sub, *args)

    def output_rows(self, x):
        return x

    def embed(self, ids, name):
        return embedding(self.gb, ids, self.w[f"{self.prefix}{name}.weight"])

    def linear(self, x, name):
        return linear(self.gb, x, self.w[f"{self.prefix}{name}.weight"], self.floats.get(f"{self.prefix}{name}.bias"))

    def rms_norm(self, x, name):
        """``weight * (x / sqrt(mean(x**2, -1) + eps))`` over the last axis."""
        gb = self.gb
        ms = gb.op("ReduceMean", [gb.op("Mul", [x, x]), gb.i64(-1)], keepdims=1)
        inv = gb.op("Reciprocal", [gb.op("Sqrt", [gb.op("Add", [ms, gb.f32(self.cfg.rms_eps)])])])
        return self._like(x, gb.op("Mul", [self.floats[f"{self.prefix}{name}.weight"], gb.op("Mul", [x, inv])]))

    def layer_norm(self, x, name):
        """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis (as torch's LayerNorm)."""
        gb, p = self.gb, f"{self.prefix}{name}"
        centred = gb.op("Sub", [x, gb.op("ReduceMean", [x, gb.i64(-1)], keepdims=1)])
        var = gb.op("ReduceMean", [gb.op("Mul", [centred, centred]), gb.i64(-1)], keepdims=1)
        inv = gb.op("Reciprocal", [gb.op("Sqrt", [gb.op("Add", [var, gb.f32(self.cfg.rms_eps)])])])
        return gb.op("Add", [gb.op("Mul", [gb.op("Mul", [centred, inv]), self.floats[f"{p}.weight"]]),
                             self.floats[f"{p}.bias"]])

    def _like(self, x, y):
        """``y`` has ``x``'s head shape (if ``x`` is head-shaped)."""
        if x in self.heads:
            self.heads[y] = self.heads[x]
        return y

    def split_heads(self, x, heads, head_dim):
        y = self.gb.op("Reshape", [x, self.gb.i64(-1, heads, head_dim)])
        self.heads[y] = (heads, head_dim)
        return y

    def rope(self, x):
        """``x * cos + rotate_half(x) * sin`` on heads ``x [T, heads, head_dim]``."""
        gb, hd = self.gb, self.heads[x][1]
        half = hd // 2
        lo = gb.op("Slice", [x, gb.i64(0), gb.i64(half), gb.i64(-1)])
        hi = gb.op("Slice", [x, gb.i64(half), gb.i64(hd), gb.i64(-1)])
        rotated = gb.op("Concat", [gb.op("Neg", [hi]), lo], axis=-1)
        return self._like(x, gb.op("Add", [gb.op("Mul", [x, self.pos.cos]), gb.op("Mul", [rotated, self.pos.sin])]))

    def attend(self, q, k, v, layer, scale, window=0, sinks=None):
        """Writes ``present.L.key``/``value`` ([1, kv, P+T, hd]); GQA by grouping query heads per kv head.

        A sliding window uses the positions' window mask (``cfg.sliding_window``, the only window);
        sinks join the softmax as one more column per head, dropped after it."""
        gb = self.gb
        (nh, hd), (nkv, _), (_, vd) = self.heads[q], self.heads[k], self.heads[v]
        # [T, heads, hd] -> [1, heads, T, hd]: the cache layout
        k = gb.op("Unsqueeze", [gb.op("Transpose", [k], perm=[1, 0, 2]), gb.i64(0)])
        v = gb.op("Unsqueeze", [gb.op("Transpose", [v], perm=[1, 0, 2]), gb.i64(0)])
        if self.decode:
            k = gb.op("Concat", [f"past.{layer}.key", k], axis=2)
            v = gb.op("Concat", [f"past.{layer}.value", v], axis=2)
        gb.op("Identity", [k], outputs=[f"present.{layer}.key"])
        gb.op("Identity", [v], outputs=[f"present.{layer}.value"])
        # GQA without copies: query head h = kv * rep + r uses kv head h // rep (repeat_interleave)
        rep = nh // nkv
        qh = gb.op("Reshape", [gb.op("Transpose", [q], perm=[1, 0, 2]), gb.i64(nkv, rep, -1, hd)])
        kh = gb.op("Reshape", [k, gb.i64(nkv, 1, -1, hd)])
        vh = gb.op("Reshape", [v, gb.i64(nkv, 1, -1, vd)])
        scores = gb.op("MatMul", [qh, gb.op("Transpose", [kh], perm=[0, 1, 3, 2])])
        scores = gb.op("Mul", [scores, gb.f32(scale)])
        assert not window or window == self.cfg.sliding_window
        mask = self.pos.window_mask if window else self.pos.mask
        if mask is not None:
            scores = gb.op("Add", [scores, mask])
        if sinks is None:
            probs = gb.op("Softmax", [scores], axis=-1)
        else:  # [nh] -> [nkv, rep, T, 1], one more column of every row's softmax
            first = gb.op("Slice", [scores, gb.i64(0), gb.i64(1), gb.i64(-1)])
            sink = gb.op("Expand", [gb.op("Reshape", [self.floats[f"{self.prefix}{sinks}"], gb.i64(nkv, rep, 1, 1)]),
                                    gb.op("Shape", [first])])
            probs = gb.op("Softmax", [gb.op("Concat", [scores, sink], axis=-1)], axis=-1)
            probs = gb.op("Slice", [probs, gb.i64(0), gb.i64(-1), gb.i64(-1)])
        ctx = gb.op("MatMul", [probs, vh])                                       # [nkv, rep, T, vd]
        ctx = gb.op("Transpose", [gb.op("Reshape", [ctx, gb.i64(nh, -1, vd)])], perm=[1, 0, 2])
        return gb.op("Reshape", [ctx, gb.i64(-1, nh * vd)])

    def slice_last(self, x, start, stop):
        y = self.gb.op("Slice", [x, self.gb.i64(start), self.gb.i64(stop), self.gb.i64(-1)])
        if x in self.heads:
            self.heads[y] = (self.heads[x][0], stop - start)
        return y

    def concat_last(self, a, b):
        y = self.gb.op("Concat", [a, b], axis=-1)
        if a in self.heads:
            self.heads[y] = (self.heads[a][0], self.heads[a][1] + self.heads[b][1])
        return y

    def head_linear(self, x, name):
        """``[T, h, in]`` -> ``[h, T, in]`` @ ``[h, in, out]`` -> ``[T, h, out]``."""
        gb, weight = self.gb, self.floats[f"{self.prefix}{name}.weight"]
        w = gb.op("Transpose", [weight], perm=[0, 2, 1])
        y = gb.op("Transpose", [gb.op("MatMul", [gb.op("Transpose", [x], perm=[1, 0, 2]), w])], perm=[1, 0, 2])
        heads, out, _ = gb.store.arrays[weight].shape
        self.heads[y] = (heads, out)
        return y

    def merge_heads(self, x):
        return self.gb.op("Reshape", [x, self.gb.i64(0, -1)])

    def clamp(self, x, low, high):
        bound = [("" if b is None else self.gb.f32(b)) for b in (low, high)]  # "": no bound on that side
        return self.gb.op("Clip", [x, *bound])

    def scale(self, x, factor):
        return self.gb.op("Mul", [x, self.gb.f32(factor)])

    def add_bias(self, x, name):
        return self.gb.op("Add", [x, self.floats[f"{self.prefix}{name}"]])

    def gather_last(self, x, ids):
        return self.gb.op("GatherElements", [x, ids], axis=-1)

    def add(self, a, b):
        return self.gb.op("Add", [a, b])

    def mul(self, a, b):
        return self.gb.op("Mul", [a, b])

    def div(self, a, b):
        return self.gb.op("Div", [a, b])

    def silu(self, x):
        return self.gb.op("Mul", [x, self.gb.op("Sigmoid", [x])])

    def sigmoid(self, x):
        return self.gb.op("Sigmoid", [x])

    def softmax(self, x):
        return self.gb.op("Softmax", [x], axis=-1)

    def topk(self, x, k):
        values, indices = self.gb.op("TopK", [x, self.gb.i64(k)], n_out=2, axis=-1, largest=1, sorted=1)
        return values, indices

    def keep_top_groups(self, x, groups, keep, top):
        """``[T, E]`` -> ``[T, G, E/G]``; group scores, the best groups scattered into a ``[T, G]`` mask."""
        gb, n = self.gb, self.cfg.num_experts
        g = gb.op("Reshape", [x, gb.i64(-1, groups, n // groups)])
        best, _ = gb.op("TopK", [g, gb.i64(top)], n_out=2, axis=-1, largest=1, sorted=1)
        scores = gb.op("ReduceSum", [best, gb.i64(-1)], keepdims=0)                    # [T, G]
        _, kept = gb.op("TopK", [scores, gb.i64(keep)], n_out=2, axis=-1, largest=1, sorted=1)
        zeros = gb.op("ConstantOfShape", [gb.op("Shape", [scores])])
        ones = gb.op("ConstantOfShape", [gb.op("Shape", [kept])], value=helper.make_tensor("one", FLOAT, [1], [1.0]))
        mask = gb.op("ScatterElements", [zeros, kept, ones], axis=1)
        mask = gb.op("Greater", [gb.op("Unsqueeze", [mask, gb.i64(-1)]), gb.f32(0.0)])   # [T, G, 1]
        return gb.op("Reshape", [gb.op("Where", [mask, g, gb.f32(-np.inf)]), gb.i64(-1, n)])

    def jitter_mask(self, x, ref, eps):
        gb = self.gb
        far = gb.op("Div", [gb.op("Sub", [ref, x]), gb.op("Max", [gb.op("Abs", [x]), ref])])
        return gb.op("Where", [gb.op("Greater", [far, gb.f32(2 * eps)]), gb.f32(-np.inf), x])

    def mask_ids(self, x, ids):
        gb = self.gb
        inf = gb.op("ConstantOfShape", [gb.op("Shape", [ids])],
                    value=helper.make_tensor("minus_inf", FLOAT, [1], [-np.inf]))
        return gb.op("ScatterElements", [x, ids, inf], axis=-1)

    def sum_last(self, x):
        return self.gb.op("ReduceSum", [x, self.gb.i64(-1)], keepdims=1)

    def mask_experts(self, logits, layer):
        dropped = self.dropped.get(layer)
        if not dropped:
            return logits
        mask = np.zeros(self.cfg.num_experts, np.float32)
        mask[dropped] = -np.inf
        return self.gb.op("Add", [logits, self.gb.const(mask)])

    def routed_experts(self, x, routing: Routing, layer):
        """One ``If`` per expert, run when some token chose it (see the module docstring)."""
        gb, n = self.gb, self.cfg.num_experts
        zeros = gb.op("ConstantOfShape", [gb.op("Shape", [routing.probs])])  # float32 0 [T, E]
        ones = gb.op("ConstantOfShape", [gb.op("Shape", [routing.weights])],
                     value=helper.make_tensor("one", FLOAT, [1], [1.0]))
        merged = self.plan.merged_into(layer) if self.plan is not None else {}
        if merged:  # an absorbed expert's slots go to the kept one: two slots may name it, gates add up
            table = np.arange(n, dtype=np.int64)
            table[list(merged)] = list(merged.values())
            ids = gb.op("Gather", [gb.const(table), routing.ids], axis=0)
            gates = gb.op("ScatterElements", [zeros, ids, routing.weights], axis=1, reduction="add")
            hits = gb.op("ScatterElements", [zeros, ids, ones], axis=1, reduction="add")
        else:
            gates = gb.op("ScatterElements", [zeros, routing.ids, routing.weights], axis=1)
            hits = gb.op("ScatterElements", [zeros, routing.ids, ones], axis=1)
        routed = gb.op("Greater", [gb.op("ReduceMax", [hits, gb.i64(0)], keepdims=0), gb.f32(0.0)])
        # one Split into E one-element conditions (cheaper than a Gather per expert)
        conds = gb.op("Split", [routed], n_out=n, axis=0, num_outputs=n)
        conds = [conds] if isinstance(conds, str) else conds
        acc = gb.op("ConstantOfShape", [gb.op("Shape", [x])])  # float32 zeros [T, H]
        for e in range(n):
            if self.plan is not None and not self.plan.is_stored(layer, e):
                continue  # dropped (never chosen, mask_experts) or served by the expert it merged into
            w1 = self.w[expert_key(layer, e, "w1")]
            with gb.meta(layer=layer, expert=e, bits=w1.bits, group_size=w1.group_size), gb.name_scope(f"E{e}"):
                acc = self._expert_if(layer, e, x, gates, hits, conds[e], acc)
        return acc

    def _expert_if(self, layer, e, x, gates, hits, cond, acc):
        gb = self.gb
        col = gb.scalar_i64(e)
        then = gb.branch()
        tok = then.op("NonZero", [then.op("Gather", [hits, col], axis=1)])            # [1, n]
        tok_col = then.op("Transpose", [tok], perm=[1, 0])                               # [n, 1] ScatterND indices
        tok_flat = then.op("Reshape", [tok, then.i64(-1)])                               # [n]
        xe = then.op("Gather", [x, tok_flat], axis=0)                                    # [n, H]
        ge = then.op("Unsqueeze", [then.op("Gather", [then.op("Gather", [gates, col], axis=1), tok_flat], axis=0),
                                   then.i64(-1)])                                        # [n, 1]
        expert = {f"{p}.weight": self.w[expert_key(layer, e, p)] for p in ("w1", "w3", "w2")}
        biases = {}
        if self.cfg.expert_bias:  # row e of the stacked [E, out] biases
            biases = {f"{p}.bias": then.op("Gather", [self.floats[f"{self.prefix}{p}_bias"], col], axis=0)
                      for p in ("w1", "w3", "w2")}
        ye = then.op("Mul", [blocks.expert(OnnxOps(then, self.cfg, expert, biases, None, False), self.cfg, layer, xe),
                             ge])
        out_then = then.op("ScatterND", [acc, tok_col, ye], reduction="add")
        other = gb.branch()
        out_else = other.op("Identity", [acc])
        shape = [None, self.cfg.hidden_size]
        then_graph = then.to_graph(f"L{layer}_E{e}_routed", [], [tensor_info(out_then, FLOAT, shape)])
        else_graph = other.to_graph(f"L{layer}_E{e}_skip", [], [tensor_info(out_else, FLOAT, shape)])
        return gb.op("If", [cond], then_branch=then_graph, else_branch=else_graph)
