"""Relax prefill function: a whole prompt chunk in one call, experts as grouped GEMMs (the prefill ``Ops``).

``prefill(tokens [T] int32, pos [1] int64, cache_k_0, cache_v_0, …, *params) -> (logits [1, V], cache_k_0, …)``
with ``T`` and ``P`` (= ``pos``, the cached length) symbolic: row ``t`` sits at position ``P + t``,
its key and value are written into the fixed-capacity caches in place (as in decode), and it
attends causally over rows ``0..P+t``; the logits are those of the last row (the next token). Each MoE layer sorts
its ``T * top_k`` (token, slot) pairs per bit class by expert id in that class' stack
(``argsort`` of the remapped id, pairs of other classes last), computes
``offsets[e] = #pairs with id < e``, runs one grouped GEMM per projection over the sorted
rows (each expert's weights read once for all its tokens, experts without tokens skipped;
an int8-activation kernel quantizes each token's row once and gathers the sorted rows itself),
and scatters the rows back to their pairs. Dense projections are grouped GEMMs with one
"expert" holding every row. Causal attention (scores, softmax, values: one fused kernel without a sliding window or sinks, three
kernels with them), RMSNorm, SiLU and small float projections (routers) are parallel, vectorised CPU kernels
(:mod:`moec.lower.kernels.attention`, :mod:`moec.lower.kernels.rowwise`); on a GPU (an emitter without
``cpu_rows``) the grouped GEMMs are ``schedules/cuda_gemm.py``'s, causal attention
``schedules/cuda_attention.py``'s (the TE forms its rules schedule with a sliding window or sinks), norms and
SiLU the TE forms. Everything else is the decode builder's ops on ``[T, ...]`` rows.

A nested layer (``moec compile --nested``: one stack of every expert) sorts the pairs by expert id and
runs one nested grouped GEMM per projection (:mod:`moec.lower.kernels.nested_grouped`; with int8 activations,
x86 AVX-512 VNNI or AVX2: :mod:`moec.lower.schedules.int8_nested_gemm`, which gathers the token rows itself) at the widths
of the run-time table ``layers.L.experts.prec`` that the decode function reads too, so a
``set_plan`` applies to the next prefill as to the next decode step.

The function is emitted only when every expert stack has a grouped-GEMM kernel
(:meth:`PrefillBuilder.supported`); otherwise the runtime prefills with decode steps.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx

from moec.arch import blocks
from moec.core.run_plan import prec_table_name
from moec.lower import te_ops
from moec.lower.decode_graph import DecodeBuilder
from moec.lower.kernels.attention import causal_attention_kernel, causal_scores_kernel, causal_values_kernel
from moec.lower.kernels.factory import add_kernel
from moec.lower.kernels.rowwise import rms_norm_kernel, silu_kernel, softmax_kernel


class PrefillBuilder(DecodeBuilder):
    """Builds the ``prefill`` function; shares parameters and ops with the decode graph."""

    function_name, tokens_name = "prefill", "tokens"
    rows_first = True  # the new keys and values are [T, kv_heads, width]

    def supported(self) -> bool:
        """Whether the emitter has grouped-GEMM kernels for every expert stack (fixed-width or nested)."""
        return all(self.emitter.has_grouped(e) for n, e in self.params.entries.items() if ".experts." in n)

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
        table = self._rope_table(x)
        if table is None:
            return self.bb.emit_te(te_ops.rope_rows, x, self.p, self._inv_freq())
        return self.bb.emit_te(te_ops.rope_apply, x, table, primfunc_name_hint="rope_rows")

    def rms_norm(self, x, name):
        """RMSNorm of ``[T, width]`` rows (or ``[T, heads, hd]``, per head) with the vectorised kernel: the decode
        builder's arithmetic bit for bit."""
        weight = self.vars[f"{self.prefix}{name}.weight"]
        shape = x.ty.shape
        width = shape[-1]
        if (not self.emitter.cpu_rows or x.ty.ndim not in (2, 3) or not isinstance(width, tirx.IntImm)
                or weight.ty.dtype != "float32"):
            return super().rms_norm(x, name)
        rows = shape[0] * shape[1] if x.ty.ndim == 3 else shape[0]
        flat = self._reshape(x, (rows, width)) if x.ty.ndim == 3 else x
        gv = add_kernel(self.bb, rms_norm_kernel(int(width), self.cfg.rms_eps),
                        f"row_rms_norm_{int(width)}_e{int(np.float32(self.cfg.rms_eps).view(np.uint32)):x}")
        y = self.bb.emit(relax.call_tir(gv, [flat, weight], relax.TensorType((rows, width), "float32")))
        return self._reshape(y, shape) if x.ty.ndim == 3 else y

    def silu(self, x):
        if x.ty.ndim != 2 or not self.emitter.cpu_rows:
            return super().silu(x)
        rows, width = x.ty.shape
        return self._kernel_call(silu_kernel(int(width)), f"row_silu_{int(width)}", [x], (rows, width))

    def attend(self, q, k, v, layer, scale, window=0, sinks=None):
        """Causal attention of ``T`` rows at positions ``P..P+T-1`` over the cache and themselves."""
        bb = self.bb
        rows, heads = q.ty.shape[0], q.ty.shape[1]
        vd = v.ty.shape[2]
        keys, values = self._write_cache(self.cache[2 * layer], k, self.cache[2 * layer + 1], v, self.p + rows)
        q = bb.emit(relax.op.multiply(q, relax.const(np.float32(scale))))
        if not self.emitter.cpu_rows:  # a GPU: the emitter's kernel, else the TE forms scheduled by its rules
            attn = None if window or sinks is not None else self.emitter.prefill_attention(bb, q, keys, values)
            if attn is not None:
                return bb.emit(relax.op.reshape(attn, (rows, heads * vd)))
            scores = self._softmax_input(bb.emit_te(te_ops.causal_row_scores, q, keys), window, sinks)
            probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
            attn = bb.emit_te(te_ops.causal_row_values, probs, values)
            return bb.emit(relax.op.reshape(attn, (rows, heads * vd)))
        kv_heads, keys_len = keys.ty.shape[0], keys.ty.shape[1]
        keys_t = bb.emit(relax.op.permute_dims(keys, [0, 2, 1]))
        if not window and sinks is None:  # scores, softmax and values in one kernel (same arithmetic)
            hd = int(q.ty.shape[2])
            attn = self._kernel_call(causal_attention_kernel(int(heads), int(kv_heads), hd, int(vd)),
                                     f"causal_attention_h{int(heads)}_kv{int(kv_heads)}_d{hd}_v{int(vd)}",
                                     [q, keys_t, values], (rows, heads, vd))
            return bb.emit(relax.op.reshape(attn, (rows, heads * vd)))
        scores = self._kernel_call(causal_scores_kernel(int(heads), int(kv_heads), int(q.ty.shape[2])),
                                   f"causal_scores_h{int(heads)}_kv{int(kv_heads)}_d{int(q.ty.shape[2])}", [q, keys_t],
                                   (heads, rows, keys_len))
        logits = self._softmax_input(scores, window, sinks)
        causal = sinks is None  # a sink column breaks the "masked past the row's position" layout
        probs = self._kernel_call(softmax_kernel(int(heads), causal=causal),
                                  f"attn_softmax_h{int(heads)}{'_causal' if causal else ''}", [logits],
                                  tuple(logits.ty.shape))
        attn = self._kernel_call(causal_values_kernel(int(heads), int(kv_heads), int(vd)),
                                 f"causal_values_h{int(heads)}_kv{int(kv_heads)}_v{int(vd)}", [probs, values], (rows, heads, vd))
        return bb.emit(relax.op.reshape(attn, (rows, heads * vd)))

    def _kernel_call(self, func, name, args, shape):
        """Call a prefill CPU kernel (opaque to fusion, one per distinct ``name``: layers of one shape share
        it) on ``args``; float32 output of ``shape``."""
        gv = add_kernel(self.bb, func, name)
        return self.bb.emit(relax.call_tir(gv, args, relax.TensorType(shape, "float32")))

    def routed_experts(self, x, routing, layer):
        """Per bit class: sort the (token, slot) pairs by expert, grouped GEMMs, scatter back."""
        if f"layers.{layer}.experts.nested.w1" in self.params.entries:
            return self._nested_experts(x, routing, layer)
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
            token_rows = bb.emit(relax.op.take(token_of, order, axis=0, mode="clip"))    # sorted -> token
            name = f"layers.{layer}.experts.b{c}"
            xs, xrows = self._expert_rows(x, token_rows, self.params.entries[f"{name}.w1"])
            sorted_slots = bb.emit(relax.op.take(slots, order, axis=0, mode="clip")) if cfg.expert_bias else None
            g1, g3 = (self._expert_bias(self.emitter.grouped(bb, xs, self.params.entries[f"{name}.{w}"], self.vars,
                                                             f"{name}.{w}", offsets, xrows), layer, w, sorted_slots)
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

    def _expert_rows(self, x, token_rows, entry):
        """``(rows, indices)`` the first grouped GEMMs of a layer take: ``x`` and ``token_rows`` where the kernel reads
        ``x[token_rows[p]]`` itself (:meth:`LinearEmitter.gathers_rows`), else the gathered rows and None."""
        if self.emitter.gathers_rows(entry):
            return x, token_rows
        return self.bb.emit(relax.op.take(x, token_rows, axis=0, mode="clip")), None

    def _nested_experts(self, x, routing, layer):
        """A nested stack (every expert, one stack): the pairs sorted by expert id, one nested grouped GEMM
        per projection at the widths of the run-time table ``layers.L.experts.prec``, scattered back."""
        bb, cfg = self.bb, self.cfg
        rows, top_k = x.ty.shape[0], cfg.top_k
        pairs = rows * top_k
        ids = bb.emit(relax.op.reshape(routing.ids, (pairs,)))                            # pair -> expert
        order = bb.emit(relax.op.argsort(ids, axis=0, dtype="int32"))                     # sorted -> pair
        below = relax.op.less(relax.op.reshape(ids, (pairs, 1)),
                              relax.const(np.arange(cfg.num_experts + 1, dtype=np.int32).reshape(1, -1)))
        offsets = bb.emit(relax.op.sum(relax.op.astype(below, "int32"), axis=0))         # [E + 1]
        token_of = relax.op.floor_divide(relax.op.arange(0, pairs, 1, "int32"), relax.const(np.int32(top_k)))
        token_rows = bb.emit(relax.op.take(token_of, order, axis=0, mode="clip"))          # sorted -> token
        sorted_ids = bb.emit(relax.op.take(ids, order, axis=0, mode="clip")) if cfg.expert_bias else None
        prec, name = self.vars[prec_table_name(layer)], f"layers.{layer}.experts.nested"

        def call(inp, proj, rows=None):
            return self.emitter.nested_grouped(bb, inp, self.params.entries[f"{name}.{proj}"], self.vars,
                                               f"{name}.{proj}", offsets, prec, rows)

        xs, xrows = self._expert_rows(x, token_rows, self.params.entries[f"{name}.w1"])
        g1, g3 = (self._expert_bias(call(xs, w, xrows), layer, w, sorted_ids) for w in ("w1", "w3"))
        out = call(blocks.glu(self, cfg, g1, g3), "w2")
        out = bb.emit(relax.op.take(out, relax.op.argsort(order, axis=0, dtype="int32"), axis=0, mode="clip"))
        y = bb.emit(relax.op.reshape(self._expert_bias(out, layer, "w2", ids), (rows, top_k, cfg.hidden_size)))
        return bb.emit(relax.op.sum(relax.op.multiply(y, relax.op.reshape(routing.weights, (rows, top_k, 1))), axis=1))
