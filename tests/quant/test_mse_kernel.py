"""The compiled ``mse`` search (moec/quant/mse_kernel.py) gives the original numpy search's bits."""

from __future__ import annotations

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.quant import mse_kernel
from moec.quant.methods import MSE_SHRINKS, kernel_searches, mse_params
from tests.quant import reference_quantizers as ref


def _weights(rng, rows, groups, gs):
    w = (rng.standard_normal((rows, groups * gs)) * rng.exponential(size=(rows, 1)) * 0.05)
    w = w.astype(np.float32).reshape(rows, groups, gs)
    w[0, 0] = 0.0                          # all zero: scale 1.0
    w[1, 0] = np.abs(w[1, 0]) + 0.01       # positive only: lo = 0
    w[2, 0] = -np.abs(w[2, 0])             # negative only: hi = 0
    w[3, 0] *= 4000.0                      # large
    w[4, 0] *= 1e-5                        # tiny: fp16 subnormal scales
    w[5, 0, : gs // 2] = 0.37              # ties and repeated values
    w[6, 0, 0] = 3.0                       # one outlier
    return w


@pytest.mark.parametrize("bits, gs", [(2, 5), (3, 40), (4, 128), (8, 16), (4, 20), (6, 64), (2, 8), (3, 127)])
def test_kernel_equals_the_original_search(bits, gs):
    rng = np.random.default_rng(bits * 1000 + gs)
    wg = _weights(rng, 64, 3, gs)
    imp = rng.exponential(size=(1, 3, gs)).astype(np.float32)
    imp[0, 1, : gs // 3] = 0.0  # dead input channels
    assert kernel_searches(gs)
    for importance in (None, imp):
        scale, zero = mse_kernel.mse_search(wg, bits, importance, MSE_SHRINKS)
        want_scale, want_zero = ref.mse_params(wg, bits, importance)
        assert scale.dtype == np.float16 and zero.dtype == np.uint8
        assert np.array_equal(scale.view(np.uint16), want_scale.view(np.uint16))
        assert np.array_equal(zero, want_zero)
    # the search really searches: some groups keep a clipped range (not plain RTN)
    assert (scale != ref.mse_params(wg, bits, importance, shrinks=(1.0,))[0]).any()


def test_other_shrinks_and_large_groups():
    rng = np.random.default_rng(5)
    wg = _weights(rng, 16, 2, 64)
    shrinks = (1.0, 0.9, 0.75, 0.6)
    assert np.array_equal(mse_params(wg, 3, None, shrinks)[0], ref.mse_params(wg, 3, None, shrinks)[0])
    big = _weights(rng, 8, 2, 256)  # above numpy's pairwise block: the numpy loop runs
    assert not kernel_searches(256) and not kernel_searches(64, (1.0, 1e-4))
    got, want = mse_params(big, 4), ref.mse_params(big, 4)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_scale_beyond_float16_is_one_line():
    wg = np.zeros((2, 1, 32), np.float32)
    wg[1, 0, 0] = 3.0e6
    with pytest.raises(MoecError, match="exceeds the float16 range"):
        mse_kernel.mse_search(wg, 4, None, MSE_SHRINKS)


def test_kernel_on_many_bf16_weights():
    """Checkpoint-like weights (bf16 values, ~1e5 groups): where one rounding step differs, some group shows it."""
    import torch

    rng = np.random.default_rng(11)
    w = torch.from_numpy(rng.standard_normal((2048, 2048)).astype(np.float32) * 0.02)
    wg = w.bfloat16().float().numpy().reshape(2048, 32, 64)
    for bits in (3, 4):
        scale, zero = mse_kernel.mse_search(wg, bits, None, MSE_SHRINKS)
        want_scale, want_zero = ref.mse_params(wg, bits)
        assert np.array_equal(scale.view(np.uint16), want_scale.view(np.uint16))
        assert np.array_equal(zero, want_zero)
