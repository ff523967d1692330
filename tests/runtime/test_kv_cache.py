"""The KV cache of fixed capacity: allocated once, written in place, refused past its capacity in one line;
format-2 bundles (a growing cache) refused; the weights' per-call checks gone from the step."""

from __future__ import annotations

import collections
import json

import pytest

from moec.artifact.bundle import read_manifest
from moec.core.errors import MoecError
from tests.cli_helpers import assert_one_line_error, run

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from moec import api
    from tests.conftest import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("kvcache")
    make_tiny_checkpoint(root / "ckpt", hidden_size=32, num_layers=2, expert_intermediate=32)
    return api.compile_bundle(api.CompileConfig(root / "ckpt", root / "b", plan="uniform:4", group_size=32))


def test_cache_allocated_once_and_written_in_place(bundle):
    from moec.runtime.session import BundleSession
    prompt = [5, 9, 14]
    with BundleSession(bundle) as ref, BundleSession(bundle, context=8) as sess:
        want, _ = ref.generate(prompt, 6)
        buffers = list(sess.cache)
        assert sess.capacity == 8 and buffers[0].shape[1] == 8
        got, _ = sess.generate(prompt, 6)
        assert got == want  # the capacity does not change the tokens
        assert all(a is b for a, b in zip(sess.cache, buffers, strict=True))  # the same buffers, written in place
        assert sess.pos == len(prompt) + 5 and sess.kv_cache()[0].shape[1] == sess.pos
        filled = sess.kv_cache()
        sess.reset()
        sess.prefill(prompt)  # a new sequence overwrites the rows from 0
        for a, b in zip(sess.kv_cache(), filled, strict=True):
            assert (a == b[:, :len(prompt)]).all()


def test_generation_past_capacity_is_one_line(bundle):
    from moec.runtime.session import BundleSession
    with BundleSession(bundle, context=4) as sess:
        sess.prefill([1, 2, 3, 4])
        with pytest.raises(MoecError, match="KV cache is full: 1 more token.s. at position 4 pass its capacity of 4") \
                as err:
            sess.step(5)
        assert "\n" not in str(err.value) and sess.pos == 4
        with pytest.raises(MoecError, match="needs a KV cache of 6 tokens but the session's context is 4"):
            sess.generate([1, 2, 3], 4)
    for bad in (0, 10 ** 9, True, 2.5):
        with pytest.raises(MoecError, match="context must be a whole number"):
            BundleSession(bundle, context=bad)
    code, out = run("run", bundle, "--prompt", "hello world", "--max-new-tokens", "8", "--context", "3")
    assert_one_line_error(code, out, "open it with a larger context")


def test_default_context_grows_between_sequences(bundle, monkeypatch):
    from moec.runtime import session
    monkeypatch.setattr(session, "DEFAULT_CONTEXT", 4)
    with session.BundleSession(bundle) as sess:
        assert sess.capacity == 4
        got, _ = sess.generate([5, 9, 14], 4)  # needs 6 rows: not given, so the cache grows
        assert sess.capacity == 6 and len(got) == 4


def test_step_checks_no_weights(bundle):
    """Per step the VM checks the token, the position and the caches, not the weights, and does not free
    constant-size storage kernel by kernel (step_builtins.py)."""
    from moec.runtime.session import BundleSession
    with BundleSession(bundle) as sess:
        sess.prefill([1, 2])
        counts: collections.Counter = collections.Counter()

        def hook(func, sym, before, ret, *args):
            if before:
                counts[sym] += 1
            return 0

        sess.vm.set_instrument(hook)
        sess.step(3)
        inputs = 2 + 2 * sess.cfg["num_layers"]  # token, pos, key and value cache per layer
        assert counts["vm.builtin.check_tensor_info"] == inputs < len(sess.params)
        kernels = sum(n for sym, n in counts.items() if not sym.startswith("vm.builtin."))
        assert 4 * counts["vm.builtin.null_value"] < kernels  # constant-size storage is not killed (was > 1 per kernel)


def test_format_2_bundle_is_refused(bundle, tmp_path):
    import shutil
    copy = tmp_path / "old"
    shutil.copytree(bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MoecError) as err:
        read_manifest(copy)
    assert "format version 2 (a KV cache that grows by a copy per token) is not supported" in str(err.value)
    assert "\n" not in str(err.value)


def test_each_call_runs_at_its_thread_count(bundle):
    """A small bundle's decode steps run on a one-thread pool (kernels inline), its prefill calls on the prefill
    count: the pool is resized between them."""
    import os

    import tvm.runtime

    from moec.runtime.session import BundleSession
    with BundleSession(bundle, prefill_threads=2) as sess:
        assert (sess.threads, sess.prefill_threads) == (1, 2)
        seen: dict[str, set] = collections.defaultdict(set)
        entry = ["prefill"]

        def hook(func, sym, before, ret, *args):
            seen[entry[0]].add((os.environ["TVM_NUM_THREADS"], tvm.runtime.num_threads()))
            return 0

        sess.vm.set_instrument(hook)
        sess.prefill([1, 2, 3])
        entry[0] = "decode"
        sess.step(4)
        entry[0] = "prefill"
        sess.prefill([5, 6])
    assert seen["decode"] == {("1", 1)}  # a one-thread pool: kernels inline
    # the pool grows back up to the workers TVM made at its first use (this process' earlier tests decide how many)
    assert {env for env, _ in seen["prefill"]} == {"2"} and {n for _, n in seen["prefill"]} <= {1, 2}


def test_default_prefill_uses_the_pool_from_a_prompt_length(bundle):
    """Without an explicit count, a small bundle's short prefills stay on the decode thread and one of
    PREFILL_POOL_TOKENS or more tokens runs on the pool; the decode step after it is back on one thread."""
    import os

    from moec.runtime.session import PREFILL_POOL_TOKENS, BundleSession, _default_pool
    if _default_pool() < 2:
        pytest.skip("needs a pool of two or more threads")
    with BundleSession(bundle) as sess:
        assert (sess.threads, sess.thread_choice.pool_from) == (1, PREFILL_POOL_TOKENS)
        seen: list[str] = []
        sess.vm.set_instrument(lambda *a: (seen.append(os.environ["TVM_NUM_THREADS"]), 0)[1])
        sess.prefill([1, 2, 3])
        short, seen[:] = set(seen), []
        sess.reset()
        sess.prefill([1 + i % 20 for i in range(PREFILL_POOL_TOKENS)])
        long, seen[:] = set(seen), []
        sess.step(4)
        assert (short, long, set(seen)) == ({"1"}, {str(_default_pool())}, {"1"})
