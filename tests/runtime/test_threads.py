"""configure_threads: small bundles decode on one TVM thread and prefill long prompts on the pool, explicit
choices win (prefill's count apart)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tvm.runtime

from moec.core.errors import MoecError
from moec.runtime.session import (PREFILL_POOL_TOKENS, SMALL_BUNDLE_BYTES, ThreadChoice, choose_threads,
                                  configure_threads)


def _fresh_process(code: str, drop=("MOEC_NUM_THREADS",), **env) -> str:
    """stdout of ``code`` run in a new Python process (TVM's pool is process-wide and other tests
    reconfigure it), without the ``drop`` variables and with ``env`` added."""
    full = {k: v for k, v in os.environ.items() if k not in drop}
    full.update(env, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_small_bundle_one_thread_large_keeps_pool(monkeypatch):
    """In a fresh process (TVM's pool is process-wide and other tests reconfigure it)."""
    code = ("import os, tvm.runtime\n"
            "from moec.runtime.session import SMALL_BUNDLE_BYTES, configure_threads\n"
            "small = configure_threads({'weight_bytes': 1 << 20}); a = tvm.runtime.num_threads()\n"
            "env_small = os.environ['TVM_NUM_THREADS']\n"
            "big = configure_threads({'weight_bytes': SMALL_BUNDLE_BYTES * 4}); b = tvm.runtime.num_threads()\n"
            "print(small, a, big, b, env_small, os.environ['TVM_NUM_THREADS'])")
    stdout = _fresh_process(code, TVM_NUM_THREADS="2")
    small, a, big, b, env_small, env_big = map(int, stdout.split())
    assert (small, a) == (1, 1)  # decode on one thread (prefill resizes the pool for its call)
    assert (big, b) == (2, 2)
    # TVM's parallel launch runs inline only when TVM_NUM_THREADS says 1 (read on every launch)
    assert (env_small, env_big) == (1, 2)


def test_one_thread_session_keeps_the_callers_cpus():
    """TVM pins the calling thread to core 0 when it shrinks its default pool; the session undoes that, or
    two one-thread moec processes (and every subprocess started later) would share one core."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a process allowed on two or more CPUs")
    code = ("import os\n"
            "from moec.runtime.session import configure_threads\n"
            "cores = os.sched_getaffinity(0)\n"
            "assert configure_threads({'weight_bytes': 1 << 20}) == 1\n"
            "print(sorted(cores) == sorted(os.sched_getaffinity(0)))")
    stdout = _fresh_process(code, drop=("MOEC_NUM_THREADS", "TVM_NUM_THREADS", "OMP_NUM_THREADS"))
    assert stdout.strip() == "True"


def test_explicit_threads_win(monkeypatch):
    monkeypatch.setenv("MOEC_NUM_THREADS", "2")
    assert configure_threads({"weight_bytes": 1}) == 2
    assert configure_threads({"weight_bytes": 1}, threads=1) == 1
    with pytest.raises(MoecError):
        configure_threads({"weight_bytes": 1}, threads=0)


def test_choice_per_call_kind(monkeypatch):
    """Small bundles: decode on one thread, prefills of PREFILL_POOL_TOKENS or more on the pool; large: the
    pool; an explicit count is both, and ``prefill_threads`` / ``MOEC_PREFILL_THREADS`` set every
    prefill's count alone."""
    import moec.runtime.session as session

    monkeypatch.delenv("MOEC_NUM_THREADS", raising=False)
    monkeypatch.delenv("MOEC_PREFILL_THREADS", raising=False)
    monkeypatch.setattr(session, "_DEFAULT_POOL", 4)
    small, large = {"weight_bytes": 1 << 20}, {"weight_bytes": SMALL_BUNDLE_BYTES}
    auto = choose_threads(small)
    assert auto == ThreadChoice(1, 4, PREFILL_POOL_TOKENS)
    long, short = PREFILL_POOL_TOKENS, PREFILL_POOL_TOKENS - 1
    assert (auto.for_prefill(long), auto.for_prefill(short), auto.for_prefill(512)) == (4, 1, 4)
    assert choose_threads(large) == ThreadChoice(4, 4)
    assert choose_threads(small, threads=2).for_prefill(short) == 2
    assert choose_threads(small, threads=1).for_prefill(long) == 1  # an explicit count wins at any length
    assert choose_threads(small, prefill_threads=1).for_prefill(512) == 1
    monkeypatch.setattr(session, "_DEFAULT_POOL", 1)  # a one-core machine: nothing to switch
    assert choose_threads(small) == ThreadChoice(1, 1)
    monkeypatch.setattr(session, "_DEFAULT_POOL", 4)
    assert choose_threads(small, threads=2) == ThreadChoice(2, 2)
    assert choose_threads(small, prefill_threads=3) == ThreadChoice(1, 3)
    monkeypatch.setenv("MOEC_PREFILL_THREADS", "2")
    assert choose_threads(small) == ThreadChoice(1, 2)
    monkeypatch.setenv("MOEC_NUM_THREADS", "3")
    assert choose_threads(large) == ThreadChoice(3, 2)
    with pytest.raises(MoecError):
        choose_threads(small, prefill_threads=0)
    monkeypatch.setenv("MOEC_PREFILL_THREADS", "two")
    with pytest.raises(MoecError, match="MOEC_PREFILL_THREADS must be a whole number"):
        choose_threads(small)


def test_default_pool_is_not_resized():
    """A session at the default pool size does not resize the pool (nothing to pay per call);
    a different count still resizes it."""
    code = ("import tvm\n"
            "calls = []\n"
            "real = tvm.get_global_func\n"
            "tvm.get_global_func = lambda name, *a, **k: (calls.append(name), real(name, *a, **k))[1]\n"
            "from moec.runtime.session import SMALL_BUNDLE_BYTES, configure_threads\n"
            "big = configure_threads({'weight_bytes': SMALL_BUNDLE_BYTES * 4})\n"
            "first = calls.count('runtime.config_threadpool')\n"
            "small = configure_threads({'weight_bytes': 1})\n"
            "print(big, first, small, calls.count('runtime.config_threadpool'), tvm.runtime.num_threads())")
    stdout = _fresh_process(code, drop=("MOEC_NUM_THREADS", "OMP_NUM_THREADS"), TVM_NUM_THREADS="2")
    assert stdout.split() == ["2", "0", "1", "1", "1"]


def test_pool_has_every_core_after_a_one_thread_session():
    """A process that opens a small (one-thread) session first and a large one later decodes the large
    one on every core: TVM makes its workers once, at its first use (half the cores on x86 when
    TVM_NUM_THREADS is unset), and a resize cannot add them."""
    if len(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)) < 2:
        pytest.skip("needs two or more CPUs")
    code = ("import os, tvm.runtime\n"
            "from moec.runtime.session import SMALL_BUNDLE_BYTES, configure_threads\n"
            "small = configure_threads({'weight_bytes': 1}); a = tvm.runtime.num_threads()\n"
            "big = configure_threads({'weight_bytes': SMALL_BUNDLE_BYTES * 4}); b = tvm.runtime.num_threads()\n"
            "print(small, a, big, b)")
    stdout = _fresh_process(code, drop=("MOEC_NUM_THREADS", "TVM_NUM_THREADS", "OMP_NUM_THREADS"))
    small, a, big, b = map(int, stdout.split())
    assert (small, a) == (1, 1)
    assert big == b == (os.cpu_count() or 1) and b >= 2


@pytest.mark.parametrize("given", [None, "12345"])
def test_pool_spin_count_set_before_the_pool_unless_given(given):
    """A pool that only prefills (a small bundle's) spins POOL_SPIN_COUNT yields before its workers sleep (not
    TVM's 300,000, which kept a worker spinning through the decode steps after a pool prefill); a pool that
    decodes (a large bundle's) keeps TVM's; a TVM_THREAD_POOL_SPIN_COUNT given wins."""
    if len(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)) < 2:
        pytest.skip("needs two or more CPUs")
    code = ("import os, sys\n"
            "from moec.runtime.session import POOL_SPIN_COUNT, SMALL_BUNDLE_BYTES, configure_threads\n"
            "configure_threads({'weight_bytes': SMALL_BUNDLE_BYTES * int(sys.argv[1])})\n"
            "print(os.environ.get('TVM_THREAD_POOL_SPIN_COUNT', 'unset'), POOL_SPIN_COUNT)")
    env = {} if given is None else {"TVM_THREAD_POOL_SPIN_COUNT": given}
    drop = ("MOEC_NUM_THREADS", "MOEC_PREFILL_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "TVM_NUM_THREADS",
            "OMP_NUM_THREADS")
    seen, default = _fresh_process(code.replace("sys.argv[1]", "0"), drop=drop, **env).split()
    assert seen == (given or default) and int(default) < 300000
    large, _ = _fresh_process(code.replace("sys.argv[1]", "4"), drop=drop, **env).split()
    assert large == (given or "unset")
