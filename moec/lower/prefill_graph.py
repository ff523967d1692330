"""Relax prefill function: a whole prompt chunk in one call, experts as grouped GEMMs.

``prefill(tokens [T] int32, past_k_0, past_v_0, …, *params) -> (logits [1, V], present_k_0, …)``
with ``T`` and the cached length ``P`` symbolic: row ``t`` sits at position ``P + t`` and
attends causally; the logits are those of the last row (the next token). Each MoE layer sorts
its ``T * top_k`` (token, slot) pairs per bit class by expert id in that class' stack
(``argsort`` of the remapped id, pairs of other classes last), computes
``offsets[e] = #pairs with id < e``, runs one grouped GEMM per projection over the sorted
rows (each expert's weights read once for all its tokens, experts without tokens skipped),
and scatters the rows back to their pairs. Dense projections are grouped GEMMs with one
"expert" holding every row.

The function is emitted only when every expert stack has a grouped-GEMM kernel
(:meth:`PrefillBuilder.supported`); otherwise the runtime prefills with decode steps.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax, tirx

from moec.lower import te_ops
from moec.lower.decode_graph import DecodeBuilder


class PrefillBuilder(DecodeBuilder):
    """Builds the ``prefill`` function; shares parameters and helpers with the decode graph."""

    def supported(self) -> bool:
        """Whether the emitter has grouped-GEMM kernels for every expert stack."""
        return all(e.kernel for n, e in self.params.entries.items() if ".experts." in n)

    def _dense(self, bb, x, name):
        rows = x.ty.shape[0]
        if isinstance(rows, tirx.IntImm) and rows.value == 1:  # the last row's logits: a GEMV
            return super()._dense(bb, x, name)
        return self.linear.dense_rows(bb, x, self.params.entries[name], self.vars, name)

    function_name, tokens_name = "prefill", "tokens"

    def _token_count(self):
        return tirx.Var("T", "int64")

    def _last(self, bb, x):
        return bb.emit_te(te_ops.last_row, x)

    def _attention(self, bb, pre, q, k, v, past_k, past_v, p):
        """Causal attention of ``T`` rows at positions ``P..P+T-1`` over the cache and themselves."""
        cfg = self.cfg
        rows = q.ty.shape[0]
        if cfg.qk_norm == "head":
            q = bb.emit(relax.op.reshape(q, (rows * cfg.num_heads, cfg.head_dim)))
            k = bb.emit(relax.op.reshape(k, (rows * cfg.num_kv_heads, cfg.head_dim)))
            q, k = self._rms(bb, q, f"{pre}.attn.q_norm.weight"), self._rms(bb, k, f"{pre}.attn.k_norm.weight")
        q = bb.emit(relax.op.reshape(q, (rows, cfg.num_heads, cfg.head_dim)))
        k = bb.emit(relax.op.reshape(k, (rows, cfg.num_kv_heads, cfg.head_dim)))
        v = bb.emit(relax.op.reshape(v, (rows, cfg.num_kv_heads, cfg.head_dim)))
        q = bb.emit_te(te_ops.rope_rows, q, p, cfg.rope_theta)
        k = bb.emit_te(te_ops.rope_rows, k, p, cfg.rope_theta)
        keys = bb.emit(relax.op.concat([past_k, relax.op.permute_dims(k, [1, 0, 2])], axis=1))
        values = bb.emit(relax.op.concat([past_v, relax.op.permute_dims(v, [1, 0, 2])], axis=1))
        q = bb.emit(relax.op.multiply(q, relax.const(np.float32(1.0 / math.sqrt(cfg.head_dim)))))
        scores = bb.emit_te(te_ops.causal_scores, q, keys)
        probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
        attn = bb.emit_te(te_ops.causal_values, probs, values)
        attn = bb.emit(relax.op.reshape(attn, (rows, cfg.num_heads * cfg.head_dim)))
        return attn, keys, values

    def _moe(self, bb, i, h):
        cfg = self.cfg
        rows, top_k = h.ty.shape[0], cfg.top_k
        pairs = rows * top_k                                                             # pair = t*k + slot
        weights, cls_of, in_cls = self._route(bb, i, h)                                  # weights [T, k]
        classes = self.params.class_of[i]
        position = bb.emit(relax.op.arange(0, pairs, 1, "int32"))                      # pair index
        token_of = bb.emit(relax.op.floor_divide(position, relax.const(np.int32(top_k))))
        y = None
        for c in sorted(set(classes.tolist())):
            count = int((classes == c).sum())
            key = bb.emit(relax.op.where(relax.op.equal(cls_of, relax.const(np.int32(c))), in_cls,
                                         relax.const(np.int32(count))))
            order = bb.emit(relax.op.argsort(key, axis=0, dtype="int32"))               # sorted -> pair
            below = relax.op.less(relax.op.reshape(key, (pairs, 1)),
                                  relax.const(np.arange(count + 1, dtype=np.int32).reshape(1, -1)))
            offsets = bb.emit(relax.op.sum(relax.op.astype(below, "int32"), axis=0))    # [count + 1]
            xs = bb.emit(relax.op.take(h, relax.op.take(token_of, order, axis=0, mode="clip"), axis=0, mode="clip"))
            name = f"layers.{i}.experts.b{c}"
            g1, g3 = (self.linear.grouped(bb, xs, self.params.entries[f"{name}.{w}"], self.vars,
                                          f"{name}.{w}", offsets) for w in ("w1", "w3"))
            act = bb.emit(relax.op.multiply(relax.op.nn.silu(g1), g3))
            out = self.linear.grouped(bb, act, self.params.entries[f"{name}.w2"], self.vars, f"{name}.w2", offsets)
            # rows past offsets[count] belong to other classes: never written by the kernel
            valid = relax.op.less(position,
                                  relax.op.take(offsets, relax.const(np.array([count], np.int32)), axis=0, mode="clip"))
            out = bb.emit(relax.op.where(relax.op.reshape(valid, (pairs, 1)), out, relax.const(np.float32(0))))
            back = bb.emit(relax.op.argsort(order, axis=0, dtype="int32"))              # pair -> sorted
            out = bb.emit(relax.op.take(out, back, axis=0, mode="clip"))
            y = out if y is None else bb.emit(relax.op.add(y, out))
        y = bb.emit(relax.op.reshape(y, (rows, top_k, cfg.hidden_size)))
        y = bb.emit(relax.op.sum(relax.op.multiply(y, relax.op.reshape(weights, (rows, top_k, 1))), axis=1))
        return self._shared(bb, h, f"layers.{i}.mlp", y)
