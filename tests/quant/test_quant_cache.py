"""The quantized-weight cache: hits equal fresh quantization, keys separate what differs, bad entries are refused."""

from __future__ import annotations

import os

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.core.plan import BitPlan, uniform_plan
from moec.models.checkpoint import load_checkpoint
from moec.quant.cache import QuantCache, cache_key
from moec.quant.packed_model import pack_model, pack_weight


@pytest.fixture(scope="module")
def w():
    return (np.random.default_rng(0).standard_normal((32, 128)) * 0.05).astype(np.float32)


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("packed", "scale", "zero"))


def test_hit_equals_fresh_and_counts(w, tmp_path):
    cache = QuantCache(tmp_path / "c")
    first = pack_weight(w, 3, 32, "mse", cache=cache)
    again = pack_weight(w, 3, 32, "mse", cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert _same(first, again) and _same(again, pack_weight(w, 3, 32, "mse"))


def test_key_separates_everything_that_changes_the_result(w):
    imp = np.ones(128, np.float32)
    h = np.eye(128)
    base = cache_key(w, 4, 32, "mse")
    others = [cache_key(w, 2, 32, "mse"), cache_key(w, 4, 64, "mse"), cache_key(w, 4, 32, "hqq"),
              cache_key(w, 4, 32, "mse", importance=imp), cache_key(w * 1.001, 4, 32, "mse"),
              cache_key(w.reshape(64, 64), 4, 32, "mse"), cache_key(w, 4, 32, "gptq", hessian=h),
              cache_key(w, 4, 32, "gptq", hessian=2 * h),
              cache_key(w, 4, 32, "gptq", hessian=h, gptq_options={"damp": 0.1})]
    assert len({base, *others}) == 1 + len(others)
    assert cache_key(w, 4, 32, "mse") == base


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other-key"])
def test_damaged_entry_is_a_miss_and_is_replaced(w, tmp_path, damage):
    cache = QuantCache(tmp_path / "c")
    good = pack_weight(w, 4, 32, "rtn", cache=cache)
    (path,) = list((tmp_path / "c").glob("??/*.qc"))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10          # a payload byte: only the sha256 can tell
    elif damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a cache entry")
    else:                         # a valid entry of another weight copied over this key
        pack_weight(w + 1.0, 4, 32, "rtn", cache=cache)
        other = next(p for p in (tmp_path / "c").glob("??/*.qc") if p != path)
        data = bytearray(other.read_bytes())
    path.write_bytes(bytes(data))
    again = pack_weight(w, 4, 32, "rtn", cache=cache)
    assert _same(good, again) and cache.hits == 0
    assert QuantCache(tmp_path / "c").get(path.stem, w.shape, 4, 32) is not None  # rewritten, now good


def test_cache_stays_under_its_bound(w, tmp_path):
    one = QuantCache(tmp_path / "probe")
    pack_weight(w, 8, 32, "rtn", cache=one)
    size = next((tmp_path / "probe").glob("??/*.qc")).stat().st_size
    cache = QuantCache(tmp_path / "c", max_bytes=int(3.5 * size))
    for i in range(8):
        pack_weight(w + i, 8, 32, "rtn", cache=cache)
    files = list((tmp_path / "c").glob("??/*.qc"))
    assert 1 <= len(files) <= 3 and sum(p.stat().st_size for p in files) <= 3.5 * size
    newest = cache_key(w + 7, 8, 32, "rtn")
    assert any(p.stem == newest for p in files)  # least recently used went first


def test_unwritable_cache_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MoecError, match="cannot create quantization cache"):
        QuantCache(blocker / "c")


def test_second_plan_requantizes_only_new_pairs(tiny_checkpoint, tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    cache = QuantCache(tmp_path / "c")
    u4, u2 = (uniform_plan(model.cfg, b, group_size=32) for b in (4, 2))
    packed4 = pack_model(model, u4, cache=cache)
    pack_model(model, u2, cache=cache)
    n = len(packed4)
    mixed = BitPlan({l: {e: (2, 4)[e % 2] for e in ex} for l, ex in u4.experts.items()}, dict(u4.tensors),
                    group_size=32, model_fingerprint=model.cfg.fingerprint(), method=u4.method)
    before = cache.hits
    packed = pack_model(model, mixed, cache=cache)
    assert cache.hits - before == n - sum(1 for p in packed.values() if p.bits == 16)
    fresh = pack_model(model, mixed)
    assert all(_same(packed[k], fresh[k]) for k in fresh if fresh[k].bits != 16)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "c"))
