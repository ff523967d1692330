"""The in-place KV-cache write kernel: rows pos..pos+T-1 written from [T, kv_heads, width], nothing else touched."""

import numpy as np
import tvm

from moec.lower.kernels.cache_write import cache_write
from moec.lower.kernels.factory import host_target


def test_cache_write_writes_only_its_rows():
    fn = tvm.compile(tvm.IRModule({"kv_cache_write": cache_write(2, 24)}), target=host_target())["kv_cache_write"]
    rng = np.random.default_rng(0)
    before = rng.standard_normal((2, 16, 24)).astype(np.float32)
    for pos, rows in ((0, 1), (5, 3), (15, 1), (0, 16)):
        new = rng.standard_normal((rows, 2, 24)).astype(np.float32)
        cache = tvm.runtime.tensor(before)
        fn(cache, tvm.runtime.tensor(new), pos)
        want = before.copy()
        want[:, pos:pos + rows] = new.transpose(1, 0, 2)
        np.testing.assert_array_equal(cache.numpy(), want)
