"""configure_threads: small bundles run on one TVM thread, explicit choices win."""

import pytest
import tvm.runtime

from moec.core.errors import MoecError
from moec.runtime.session import SMALL_BUNDLE_BYTES, configure_threads


def test_small_bundle_one_thread_large_keeps_pool(monkeypatch):
    monkeypatch.delenv("MOEC_NUM_THREADS", raising=False)
    assert configure_threads({"weight_bytes": 1 << 20}) == 1
    assert tvm.runtime.num_threads() == 1
    big = configure_threads({"weight_bytes": SMALL_BUNDLE_BYTES * 4})
    assert big >= 1 and tvm.runtime.num_threads() == big


def test_explicit_threads_win(monkeypatch):
    monkeypatch.setenv("MOEC_NUM_THREADS", "2")
    assert configure_threads({"weight_bytes": 1}) == 2
    assert configure_threads({"weight_bytes": 1}, threads=1) == 1
    with pytest.raises(MoecError):
        configure_threads({"weight_bytes": 1}, threads=0)
