"""The fused decode-attention kernel against numpy softmax attention (GQA, odd widths, several lengths)."""

import numpy as np
import pytest
import tvm

from moec.core.errors import MoecError
from moec.lower.kernels.decode_attention import decode_attention, fast_exp
from moec.lower.kernels.factory import host_target


def reference(q, keys, values, scale):
    rep = q.shape[0] // keys.shape[0]
    kv = np.arange(q.shape[0]) // rep
    s = np.einsum("hd,htd->ht", q.astype(np.float64), keys[kv].astype(np.float64)) * scale
    p = np.exp(s - s.max(1, keepdims=True))
    return np.einsum("ht,htd->hd", p / p.sum(1, keepdims=True), values[kv].astype(np.float64))


@pytest.mark.parametrize("heads,kv_heads,head_dim,value_dim", [(4, 2, 64, 64), (3, 1, 24, 40)])
def test_decode_attention_writes_in_place_and_matches_softmax_attention(heads, kv_heads, head_dim, value_dim):
    fn = tvm.compile(tvm.IRModule({"decode_attention": decode_attention(heads, kv_heads, head_dim, value_dim, 0.3)}),
                     target=host_target())["decode_attention"]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((heads, head_dim)).astype(np.float32)
    capacity = 40
    for past in (0, 14, 15, 36):  # symbolic pos: empty cache, below, at and past a vector of positions
        keys = (rng.standard_normal((kv_heads, capacity, head_dim)) * 2).astype(np.float32)
        values = rng.standard_normal((kv_heads, capacity, value_dim)).astype(np.float32)
        cache_k, cache_v = keys.copy(), values.copy()
        cache_k[:, past], cache_v[:, past] = 7.0, -7.0  # stale rows at pos: overwritten by the token
        cache_k[:, past + 1:], cache_v[:, past + 1:] = np.nan, np.nan  # rows past pos are never read
        cache_t = [tvm.runtime.tensor(cache_k), tvm.runtime.tensor(cache_v)]
        out = tvm.runtime.empty((heads, value_dim), "float32", tvm.cpu())
        new = [np.ascontiguousarray(keys[:, past:past + 1]), np.ascontiguousarray(values[:, past:past + 1])]
        fn(tvm.runtime.tensor(q), *(tvm.runtime.tensor(a) for a in new), *cache_t, past, out)
        got_k, got_v = (t.numpy() for t in cache_t)
        np.testing.assert_array_equal(got_k[:, :past + 1], keys[:, :past + 1])  # row pos written, rows before kept
        np.testing.assert_array_equal(got_v[:, :past + 1], values[:, :past + 1])
        assert np.isnan(got_k[:, past + 1:]).all() and np.isnan(got_v[:, past + 1:]).all()  # nothing past pos
        np.testing.assert_allclose(out.numpy(), reference(q, keys[:, :past + 1], values[:, :past + 1], 0.3),
                                   rtol=1e-5, atol=1e-5)


def test_fast_exp_is_exp():
    """Within 3 float32 ulp of exp over the whole range (clamped below -88: exp underflows there anyway)."""
    tirx = tvm.tirx
    a, b, i = tirx.decl_buffer((64,), "float32", "a"), tirx.decl_buffer((64,), "float32", "b"), tirx.Var("i", "int32")
    f = tirx.PrimFunc([a, b], tirx.For(i, 0, 64, tirx.ForKind.SERIAL,
                                       tirx.BufferStore(b, fast_exp(tirx.BufferLoad(a, [i])), [i])))
    fn = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=host_target())["main"]
    a_np = np.linspace(-100, 80, 64).astype(np.float32)
    out = tvm.runtime.empty((64,), "float32", tvm.cpu())
    fn(tvm.runtime.tensor(a_np), out)
    np.testing.assert_allclose(out.numpy(), np.exp(a_np.astype(np.float64)), rtol=3.6e-7, atol=1e-37)


def test_bad_head_counts_are_refused():
    with pytest.raises(MoecError, match="multiple of kv_heads"):
        decode_attention(3, 2, 64, 64, 0.125)
