"""Relax prefill function: a whole prompt chunk in one call, experts as grouped GEMMs (the prefill ``Ops``).

``prefill(tokens [T] int32, past_k_0, past_v_0, …, *params) -> (logits [1, V], present_k_0, …)``
with ``T`` and the cached length ``P`` symbolic: row ``t`` sits at position ``P + t`` and
attends causally; the logits are those of the last row (the next token). Each MoE layer sorts
its ``T * top_k`` (token, slot) pairs per bit class by expert id in that class' stack
(``argsort`` of the remapped id, pairs of other classes last), computes
``offsets[e] = #pairs with id < e``, runs one grouped GEMM per projection over the sorted
rows (each expert's weights read once for all its tokens, experts without tokens skipped),
and scatters the rows back to their pairs. Dense projections are grouped GEMMs with one
"expert" holding every row. Everything else is the decode builder's ops on ``[T, ...]`` rows.

The function is emitted only when every expert stack has a grouped-GEMM kernel
(:meth:`PrefillBuilder.supported`); otherwise the runtime prefills with decode steps.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx

from moec.arch import blocks
from moec.lower import te_ops
from moec.lower.decode_graph import DecodeBuilder


class PrefillBuilder(DecodeBuilder):
    """Builds the ``prefill`` function; shares parameters and ops with the decode graph."""

    function_name, tokens_name = "prefill", "tokens"

    def supported(self) -> bool:
        """Whether the emitter has grouped-GEMM kernels for every expert stack (none for nested stacks yet)."""
        return all(e.kernel and not e.nested for n, e in self.params.entries.items() if ".experts." in n)

    def _token_count(self):
        return tirx.Var("T", "int64")

    def _dense(self, x, name):
        rows = x.ty.shape[0]
        if isinstance(rows, tirx.IntImm) and rows.value == 1:  # the last row's logits: a GEMV
            return super()._dense(x, name)
        return self.emitter.dense_rows(self.bb, x, self.params.entries[name], self.vars, name)

    def output_rows(self, x):
        return self.bb.emit_te(te_ops.last_row, x)

    def split_heads(self, x, heads, head_dim):
        return self._reshape(x, (x.ty.shape[0], heads, head_dim))

    def merge_heads(self, x):
        rows, heads, width = x.ty.shape
        return self._reshape(x, (rows, heads * width))

    def rope(self, x):
        return self.bb.emit_te(te_ops.rope_rows, x, self.p, self._inv_freq())

    def attend(self, q, k, v, layer, scale, window=0, sinks=None):
        """Causal attention of ``T`` rows at positions ``P..P+T-1`` over the cache and themselves."""
        bb = self.bb
        rows, heads = q.ty.shape[0], q.ty.shape[1]
        vd = v.ty.shape[2]
        keys = bb.emit(relax.op.concat([self.past[2 * layer], relax.op.permute_dims(k, [1, 0, 2])], axis=1))
        values = bb.emit(relax.op.concat([self.past[2 * layer + 1], relax.op.permute_dims(v, [1, 0, 2])], axis=1))
        self.presents += [keys, values]
        q = bb.emit(relax.op.multiply(q, relax.const(np.float32(scale))))
        scores = self._softmax_input(bb.emit_te(te_ops.causal_scores, q, keys), window, sinks)
        probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
        attn = bb.emit_te(te_ops.causal_values, probs, values)
        return bb.emit(relax.op.reshape(attn, (rows, heads * vd)))

    def routed_experts(self, x, routing, layer):
        """Per bit class: sort the (token, slot) pairs by expert, grouped GEMMs, scatter back."""
        bb, cfg = self.bb, self.cfg
        rows, top_k = x.ty.shape[0], cfg.top_k
        pairs = rows * top_k                                                             # pair = t*k + slot
        cls_of, in_cls = self._classes(routing, layer)
        slots = bb.emit(relax.op.reshape(routing.ids, (pairs,))) if cfg.expert_bias else None  # pair -> expert
        position = bb.emit(relax.op.arange(0, pairs, 1, "int32"))                      # pair index
        token_of = bb.emit(relax.op.floor_divide(position, relax.const(np.int32(top_k))))
        y = None
        for c, count in self.params.expert_classes(layer):
            key = bb.emit(relax.op.where(relax.op.equal(cls_of, relax.const(np.int32(c))), in_cls,
                                         relax.const(np.int32(count))))
            order = bb.emit(relax.op.argsort(key, axis=0, dtype="int32"))               # sorted -> pair
            below = relax.op.less(relax.op.reshape(key, (pairs, 1)),
                                  relax.const(np.arange(count + 1, dtype=np.int32).reshape(1, -1)))
            offsets = bb.emit(relax.op.sum(relax.op.astype(below, "int32"), axis=0))    # [count + 1]
            xs = bb.emit(relax.op.take(x, relax.op.take(token_of, order, axis=0, mode="clip"), axis=0, mode="clip"))
            name = f"layers.{layer}.experts.b{c}"
            sorted_slots = bb.emit(relax.op.take(slots, order, axis=0, mode="clip")) if cfg.expert_bias else None
            g1, g3 = (self._expert_bias(self.emitter.grouped(bb, xs, self.params.entries[f"{name}.{w}"], self.vars,
                                                             f"{name}.{w}", offsets), layer, w, sorted_slots)
                      for w in ("w1", "w3"))
            act = blocks.glu(self, cfg, g1, g3)
            out = self.emitter.grouped(bb, act, self.params.entries[f"{name}.w2"], self.vars, f"{name}.w2", offsets)
            # rows past offsets[count] belong to other classes: never written by the kernel
            valid = relax.op.less(position,
                                  relax.op.take(offsets, relax.const(np.array([count], np.int32)), axis=0, mode="clip"))
            out = bb.emit(relax.op.where(relax.op.reshape(valid, (pairs, 1)), out, relax.const(np.float32(0))))
            back = bb.emit(relax.op.argsort(order, axis=0, dtype="int32"))              # pair -> sorted
            out = bb.emit(relax.op.take(out, back, axis=0, mode="clip"))
            y = out if y is None else bb.emit(relax.op.add(y, out))
        y = bb.emit(relax.op.reshape(self._expert_bias(y, layer, "w2", slots), (rows, top_k, cfg.hidden_size)))
        return bb.emit(relax.op.sum(relax.op.multiply(y, relax.op.reshape(routing.weights, (rows, top_k, 1))), axis=1))
