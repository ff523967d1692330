"""Relax decode-step function of a canonical MoE model under a bit plan: the Relax decode backend of ``Ops``.

``decode(token [1] int32, pos [1] int64, cache_k_0, cache_v_0, …, *params) -> (logits [1, V], cache_k_0, …,
[routed ids])`` where ``cache_*`` are fixed-capacity ``[kv_heads, C, head_dim]`` buffers (``C``
symbolic: the session's context) holding the keys/values of positions ``0..pos-1``; the call
writes the token's key and value into row ``pos`` of each in place (``call_tir_inplace``: no cache
is allocated or copied) and attends over rows ``0..pos``. The caches it returns are those
arguments (aliases, no copy): a local caller ignores them; over RPC, where TVM's ``set_input``
copies every tensor argument, they are the device copies the call wrote. ``pos`` becomes the symbolic ``P`` through
``tensor_to_shape``; a tensor rather than a shape argument because TVM RPC cannot pass shapes.
The function's ``num_input`` attribute counts the arguments before the parameters. The layers are
``moec.arch.blocks`` emitted through this builder's ops (activations ``[1, H]``, heads
``[heads, head_dim]``). Experts are called per bit class with the routed ids remapped into that
class' stack (see ``params.py``), so only routed experts' weights are read.
"""

from __future__ import annotations

import copy

import numpy as np
from tvm import relax, tirx

from moec.arch import blocks
from moec.arch.ops import Routing
from moec.lower import te_ops
from moec.lower.kernels.cache_write import cache_write
from moec.lower.kernels.factory import add_kernel
from moec.lower.linear import LinearEmitter
from moec.lower.params import ModelParams
from moec.core.config import MoEConfig, rope_inv_freq
from moec.core.run_plan import prec_table_name


class DecodeBuilder:
    """Emits the ``decode`` function; implements :class:`moec.arch.ops.Ops` on Relax vars."""

    #: Name of the emitted function and of its token argument.
    function_name, tokens_name = "decode", "token"

    def __init__(self, cfg: MoEConfig, params: ModelParams, linear: LinearEmitter) -> None:
        self.cfg, self.params, self.emitter = cfg, params, linear
        self.vars: dict[str, relax.Var] = {}
        for name, arr in params.flat():
            self.vars[name] = relax.Var(name, relax.TensorType(arr.shape, str(arr.dtype)))
        self.prefix = ""
        self._once: dict[str, relax.Var] = {}  # values emitted once per function, shared by every layer

    def _token_count(self):
        """Tokens per call: 1 in decode (prefill: a symbolic ``T``)."""
        return 1

    def build(self, bb: relax.BlockBuilder | None = None):
        """Emit the function into ``bb`` (a new builder if None); returns the builder's module."""
        cfg = self.cfg
        self.bb = bb = bb or relax.BlockBuilder()
        self.p = tirx.Var("P", "int64")
        capacity = tirx.Var("C", "int64")
        shapes = dict(zip("kv", cfg.kv_cache_shapes()))  # MLA: one latent "head" (see MoEConfig)
        tokens = relax.Var(self.tokens_name, relax.TensorType((self._token_count(),), "int32"))
        pos = relax.Var("pos", relax.TensorType((1,), "int64"))
        self.cache = [relax.Var(f"cache_{kind}_{i}", relax.TensorType((shapes[kind][0], capacity, shapes[kind][1]),
                                                                      "float32"))
                      for i in range(cfg.num_layers) for kind in ("k", "v")]
        self.routed: list[relax.Var] = []  # decode of nested stacks: each MoE layer's routed ids, an output
        self.written: list[relax.Var] = []  # each cache after its in-place write (the same tensor), in order
        self._views: dict[relax.Var, relax.Var] = {}  # reshape result -> the tensor it views
        self._once.clear()
        inputs = [tokens, pos] + self.cache
        with bb.function(self.function_name, inputs + list(self.vars.values()), attrs={"num_input": len(inputs)}):
            with bb.dataflow():
                shape = bb.emit(relax.op.tensor_to_shape(pos))
                bb.match_cast(shape, relax.ShapeType([self.p]))  # defines P
                logits = blocks.causal_lm(self, cfg, tokens)
                routed = [bb.emit(relax.op.concat(self.routed, axis=0))] if self.routed else []
                out = bb.emit_output(relax.Tuple([logits] + self.written + routed))
            bb.emit_func_output(out)
        # head views superseded by a later reshape of the same tensor (see _reshape) are unused
        gv = bb.get().get_global_var(self.function_name)
        bb.update_func(gv, relax.analysis.remove_all_unused(bb.get()[gv]))
        return bb.get()

    # -- structure and weights ---------------------------------------------------------
    def block(self, name, fn, *args):
        sub = copy.copy(self)  # shares the builder, vars and cache lists; only the prefix differs
        sub.prefix = f"{self.prefix}{name}."
        return fn(sub, *args)

    def output_rows(self, x):
        return x

    def embed(self, ids, name):
        return self.emitter.embed(self.bb, ids, self.params.entries[f"{self.prefix}{name}.weight"], self.vars)

    def _dense(self, x, name):
        """A linear layer on one row (decode); prefill overrides it for many rows."""
        return self.emitter.dense(self.bb, x, self.params.entries[name], self.vars, name)

    def linear(self, x, name):
        weight = f"{self.prefix}{name}.weight"
        y = self._dense(x, weight)
        bias = f"{self.prefix}{name}.bias"
        return self.bb.emit(relax.op.add(y, self.vars[bias])) if bias in self.vars else y

    def rms_norm(self, x, name):
        # marked scheduled + opaque: dlight's CPU reduction rule would recompute the sum of
        # squares once per output element; the plain loop nest is already right for a vector
        shape, heads = x.ty.shape, x.ty.ndim == 3
        if heads:  # prefill heads [T, heads, hd]: normalise rows of [T * heads, hd]
            x = self._reshape(x, (shape[0] * shape[1], shape[2]))
        y = self.bb.emit_te(te_ops.rms_norm, x, self.vars[f"{self.prefix}{name}.weight"], self.cfg.rms_eps,
                            primfunc_attrs={"tirx.is_scheduled": True, "op_pattern": 8})
        return self._reshape(y, shape) if heads else y

    def layer_norm(self, x, name):
        p = f"{self.prefix}{name}"
        return self.bb.emit_te(te_ops.layer_norm, x, self.vars[f"{p}.weight"], self.vars[f"{p}.bias"], self.cfg.rms_eps,
                               primfunc_attrs={"tirx.is_scheduled": True, "op_pattern": 8})

    def _reshape(self, x, shape):
        """``x`` reshaped; a reshape of a reshape views the original tensor (no chained copies)."""
        src = self._views.get(x, x)
        y = self.bb.emit(relax.op.reshape(src, shape))
        self._views[y] = src
        return y

    # -- attention ---------------------------------------------------------------------
    def split_heads(self, x, heads, head_dim):
        return self._reshape(x, (heads, head_dim))

    def rope(self, x):
        table = self._rope_table(x)
        if table is None:
            return self.bb.emit_te(te_ops.rope, x, self.p, self._inv_freq(), primfunc_name_hint="rope")
        return self.bb.emit_te(te_ops.rope_apply, x, table, primfunc_name_hint="rope")

    def _rope_table(self, x):
        """The call's cos/sin table (``te_ops.rope_table``: rows ``P..P+T-1``), emitted at the first RoPE and
        shared by every later one (8 RoPEs of the reference model's step computed 3,072 cos and sin, the
        table 64); None when ``x``'s head width is not twice the frequencies."""
        half = len(rope_inv_freq(self.cfg))
        if int(x.ty.shape[-1]) != 2 * half:
            return None
        if "rope_table" not in self._once:
            rows = 1 if x.ty.ndim == 2 else x.ty.shape[0]
            # opaque: one kernel per call, never fused (recomputed) into each consumer
            self._once["rope_table"] = self.bb.emit_te(te_ops.rope_table, self.p, rows, self._inv_freq(),
                                                       primfunc_name_hint="rope_table",
                                                       primfunc_attrs={"op_pattern": 8})
        return self._once["rope_table"]

    def _inv_freq(self):
        return relax.const(np.array(rope_inv_freq(self.cfg), np.float32))

    def attend(self, q, k, v, layer, scale, window=0, sinks=None):
        """One token's attention over the cache: ``[1, heads * v_head_dim]``."""
        bb = self.bb
        cache_k, cache_v = self.cache[2 * layer], self.cache[2 * layer + 1]
        kvh, hd, vd, heads = k.ty.shape[0], k.ty.shape[1], v.ty.shape[1], q.ty.shape[0]
        v, k = self._reshape(v, (kvh, 1, vd)), self._reshape(k, (kvh, 1, hd))
        if not window and sinks is None:  # cache write, scores, softmax and values in one kernel (CPU kernels)
            fused = self.emitter.decode_attention(bb, q, k, v, cache_k, cache_v, self.p, scale)
            if fused is not None:
                attn, *written = fused
                self.written += written
                return bb.emit(relax.op.reshape(attn, (1, heads * vd)))
        keys, values = self._write_cache(cache_k, k, cache_v, v, self.p + 1)
        q = bb.emit(relax.op.multiply(q, relax.const(np.float32(scale))))
        scores = self._softmax_input(bb.emit_te(te_ops.attention_scores, q, keys), window, sinks)
        probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
        attn = bb.emit_te(te_ops.attention_values, probs, values)
        return bb.emit(relax.op.reshape(attn, (1, heads * vd)))

    #: Layout of the new keys/values ``_write_cache`` gets: ``[kv_heads, 1, width]`` here, ``[T, kv_heads, width]``
    #: in prefill.
    rows_first = False

    def _write_cache(self, cache_k, k, cache_v, v, length):
        """Write the new rows ``k``/``v`` (see ``rows_first``) into the caches at ``P..`` in place; returns rows
        ``0..length-1`` of each (a copy)."""
        out = []
        order = "t" if self.rows_first else "h"
        for cache, new in ((cache_k, k), (cache_v, v)):
            heads, width = int(cache.ty.shape[0]), int(cache.ty.shape[2])
            gv = add_kernel(self.bb, cache_write(heads, width, self.rows_first),
                            f"kv_cache_write_{order}_kv{heads}_w{width}")
            written = self.bb.emit(relax.call_tir_inplace(gv, [cache, new, relax.prim_value(self.p)], [0], cache.ty))
            self.written.append(written)
            # opaque: fused into its consumer, FuseTIR cannot match the consumer's ``P + 1`` and ``P + 2`` shapes
            out.append(self.bb.emit_te(te_ops.cache_rows, written, length, primfunc_name_hint="cache_rows",
                                       primfunc_attrs={"op_pattern": 8}))
        return out

    def _softmax_input(self, scores, window, sinks):
        """Scores ``[H, (T,) S]`` with keys outside a sliding window masked and the per-head sink logit
        appended as one more column (the values kernels read only the first ``S``)."""
        if window:
            scores = self.bb.emit_te(te_ops.sliding_window, scores, window, primfunc_name_hint="sliding_window")
        if sinks is None:
            return scores
        lead = list(scores.ty.shape)[:-1]
        sink = relax.op.reshape(self.vars[f"{self.prefix}{sinks}"], [lead[0]] + [1] * len(lead))
        sink = relax.op.broadcast_to(sink, lead + [1])
        return self.bb.emit(relax.op.concat([scores, sink], axis=len(lead)))

    def slice_last(self, x, start, stop):
        axis = x.ty.ndim - 1
        return self.bb.emit(relax.op.strided_slice(x, axes=[axis], begin=[start], end=[stop]))

    def concat_last(self, a, b):
        return self.bb.emit(relax.op.concat([a, b], axis=a.ty.ndim - 1))

    def head_linear(self, x, name):
        return self.bb.emit_te(te_ops.head_linear, x, self.vars[f"{self.prefix}{name}.weight"])

    def merge_heads(self, x):
        heads, width = x.ty.shape[-2], x.ty.shape[-1]
        return self._reshape(x, (1, heads * width))

    # -- elementwise and reductions -------------------------------------------------------
    def clamp(self, x, low, high):
        if low is not None:
            x = self.bb.emit(relax.op.maximum(x, relax.const(np.float32(low))))
        if high is not None:
            x = self.bb.emit(relax.op.minimum(x, relax.const(np.float32(high))))
        return x

    def scale(self, x, factor):
        return self.bb.emit(relax.op.multiply(x, relax.const(np.float32(factor))))

    def add_bias(self, x, name):
        return self.bb.emit(relax.op.add(x, self.vars[f"{self.prefix}{name}"]))

    def gather_last(self, x, ids):
        return self.bb.emit(relax.op.gather_elements(x, ids, axis=x.ty.ndim - 1))

    def add(self, a, b):
        return self.bb.emit(relax.op.add(a, b))

    def mul(self, a, b):
        return self.bb.emit(relax.op.multiply(a, b))

    def div(self, a, b):
        return self.bb.emit(relax.op.divide(a, b))

    def silu(self, x):
        fused = self.emitter.row_silu(self.bb, x)  # vectorised exp (CPU kernels), as prefill's SiLU
        return fused if fused is not None else self.bb.emit(relax.op.nn.silu(x))

    def sigmoid(self, x):
        return self.bb.emit(relax.op.sigmoid(x))

    def softmax(self, x):
        return self.bb.emit(relax.op.nn.softmax(x, axis=-1))

    def topk(self, x, k):
        fused = self.emitter.row_topk(self.bb, x, k)  # one kernel for a router's short rows (CPU kernels)
        if fused is not None:
            return fused
        both = self.bb.emit(relax.op.topk(x, k, axis=-1, ret_type="both", dtype="int32"))
        return self.bb.emit(relax.TupleGetItem(both, 0)), self.bb.emit(relax.TupleGetItem(both, 1))

    def keep_top_groups(self, x, groups, keep, top):
        bb, rows, n = self.bb, x.ty.shape[0], self.cfg.num_experts
        g = bb.emit(relax.op.reshape(x, (rows, groups, n // groups)))
        best = bb.emit(relax.op.topk(g, top, axis=-1, ret_type="values"))
        scores = bb.emit(relax.op.sum(best, axis=-1))                                               # [R, G]
        kept = bb.emit(relax.op.topk(scores, keep, axis=-1, ret_type="indices", dtype="int32"))     # [R, keep]
        hit = relax.op.equal(relax.op.reshape(kept, (rows, keep, 1)),
                             relax.const(np.arange(groups, dtype=np.int32).reshape(1, 1, groups)))
        mask = bb.emit(relax.op.max(relax.op.astype(hit, "float32"), axis=1))                    # [R, G]
        masked = relax.op.where(relax.op.greater(relax.op.reshape(mask, (rows, groups, 1)), relax.const(np.float32(0))),
                                g, relax.const(np.float32(-np.inf)))
        return bb.emit(relax.op.reshape(masked, (rows, n)))

    def jitter_mask(self, x, ref, eps):
        op = relax.op
        far = op.divide(op.subtract(ref, x), op.maximum(op.abs(x), ref))
        return self.bb.emit(op.where(op.greater(far, relax.const(np.float32(2 * eps))),
                                     relax.const(np.float32(-np.inf)), x))

    def mask_ids(self, x, ids):
        bb, (rows, n), k = self.bb, x.ty.shape, ids.ty.shape[-1]
        hit = relax.op.equal(relax.op.reshape(ids, (rows, k, 1)),
                             relax.const(np.arange(int(n), dtype=np.int32).reshape(1, 1, -1)))
        hit = bb.emit(relax.op.max(relax.op.astype(hit, "float32"), axis=1))                    # [R, E]
        return bb.emit(relax.op.where(relax.op.greater(hit, relax.const(np.float32(0))),
                                      relax.const(np.float32(-np.inf)), x))

    def sum_last(self, x):
        return self.bb.emit(relax.op.sum(x, axis=-1, keepdims=True))

    def mask_experts(self, logits, layer):
        dropped = self.params.dropped.get(layer)
        if not dropped:
            return logits
        mask = np.zeros(self.cfg.num_experts, np.float32)
        mask[dropped] = -np.inf
        return self.bb.emit(relax.op.add(logits, relax.const(mask)))

    # -- routed experts ----------------------------------------------------------------
    def _classes(self, routing: Routing, layer: int):
        """Per (row, slot) pair, flattened to ``[R*k]``: expert bit class, index in that class' stack."""
        bb = self.bb
        idx = bb.emit(relax.op.reshape(routing.ids, (routing.ids.ty.shape[0] * self.cfg.top_k,)))
        cls_of = bb.emit(relax.op.take(relax.const(self.params.class_of[layer], "int32"), idx, axis=0, mode="clip"))
        in_cls = bb.emit(relax.op.take(relax.const(self.params.remap[layer], "int32"), idx, axis=0, mode="clip"))
        return cls_of, in_cls

    def _expert_bias(self, y, layer, proj, ids):
        """``y`` plus each row's expert bias (``ids``: the row's expert), if the family has expert biases."""
        if not self.cfg.expert_bias:
            return y
        bias = self.vars[f"layers.{layer}.mlp.{proj}_bias"]
        return self.bb.emit(relax.op.add(y, relax.op.take(bias, ids, axis=0, mode="clip")))

    def _gated(self, x, layer, name, ids, slots, call):
        """``blocks.glu(w1 x, w3 x)`` of stack ``name``'s routed ``ids``: one fused emitter call where the emitter has
        one (the plain ``silu(gate) * up``: no expert biases, no ``swiglu_limit``), else ``call(x, "w1")`` and
        ``call(x, "w3")`` (plus their biases) and :func:`blocks.glu`. Rows of id -1 are 0 either way."""
        if not self.cfg.expert_bias and not self.cfg.swiglu_limit:
            gate, up = f"{name}.w1", f"{name}.w3"
            fused = self.emitter.swiglu_experts(self.bb, x, self.params.entries[gate], self.params.entries[up],
                                                self.vars, gate, up, ids)
            if fused is not None:
                return fused
        g1, g3 = (self._expert_bias(call(x, w), layer, w, slots) for w in ("w1", "w3"))
        return blocks.glu(self, self.cfg, g1, g3)

    def routed_experts(self, x, routing, layer):
        """Per bit class, row-guarded expert GEMVs on the routed ids (others get id -1: no reads)."""
        bb, cfg = self.bb, self.cfg
        nested = f"layers.{layer}.experts.nested"
        if f"{nested}.w1" in self.params.entries:  # one stack, each expert's width read at run time
            ids = bb.emit(relax.op.reshape(routing.ids, (routing.ids.ty.shape[0] * cfg.top_k,)))
            if self.function_name == "decode":  # the last output: [MoE layers, top_k] ids (drift policy)
                self.routed.append(bb.emit(relax.op.reshape(ids, (1, cfg.top_k))))
            weights = bb.emit(relax.op.reshape(routing.weights, (cfg.top_k, 1)))
            prec = self.vars[prec_table_name(layer)]

            def call(inp, proj):
                name = f"{nested}.{proj}"
                return self.emitter.nested_experts(bb, inp, self.params.entries[name], self.vars, name, ids, prec)

            act = None
            if not cfg.expert_bias and not cfg.swiglu_limit:  # gate and up in one call where the emitter has one
                gate, up = f"{nested}.w1", f"{nested}.w3"
                act = self.emitter.nested_swiglu_experts(bb, x, self.params.entries[gate], self.params.entries[up],
                                                         self.vars, gate, up, ids, prec)
            if act is None:
                g1, g3 = (self._expert_bias(call(x, w), layer, w, ids) for w in ("w1", "w3"))
                act = blocks.glu(self, cfg, g1, g3)
            out = self._expert_bias(call(act, "w2"), layer, "w2", ids)
            return bb.emit(relax.op.sum(relax.op.multiply(out, weights), axis=0, keepdims=True))
        slots = bb.emit(relax.op.reshape(routing.ids, (cfg.top_k,))) if cfg.expert_bias else None
        weights = bb.emit(relax.op.reshape(routing.weights, (cfg.top_k, 1)))
        classes = self.params.expert_classes(layer)
        if len(classes) == 1 and bool((self.params.class_of[layer] != 0).all()):
            # one stack holding every expert: each routed id is valid, no class masks
            idx = bb.emit(relax.op.reshape(routing.ids, (cfg.top_k,)))
            ids = bb.emit(relax.op.take(relax.const(self.params.remap[layer], "int32"), idx, axis=0, mode="clip"))
            name = f"layers.{layer}.experts.b{classes[0][0]}"

            def call(inp, w):
                return self.emitter.routed_experts(bb, inp, self.params.entries[f"{name}.{w}"], self.vars,
                                                   f"{name}.{w}", ids)

            act = self._gated(x, layer, name, ids, slots, call)
            y = self._expert_bias(call(act, "w2"), layer, "w2", slots)
            return bb.emit(relax.op.sum(relax.op.multiply(y, weights), axis=0, keepdims=True))
        cls_of, in_cls = self._classes(routing, layer)
        y = None
        for c, _ in self.params.expert_classes(layer):
            member = bb.emit(relax.op.equal(cls_of, relax.const(np.int32(c))))
            ids = bb.emit(relax.op.where(member, in_cls, relax.const(np.int32(-1))))
            name = f"layers.{layer}.experts.b{c}"

            def call(inp, w):
                return self.emitter.experts(bb, inp, self.params.entries[f"{name}.{w}"], self.vars, f"{name}.{w}", ids)

            act = self._gated(x, layer, name, ids, slots, call)  # rows of other classes: w2 below writes 0 for id -1
            out = self.emitter.experts(bb, act, self.params.entries[f"{name}.w2"], self.vars, f"{name}.w2", ids)
            y = out if y is None else bb.emit(relax.op.add(y, out))
        y = self._expert_bias(y, layer, "w2", slots)
        return bb.emit(relax.op.sum(relax.op.multiply(y, weights), axis=0, keepdims=True))
