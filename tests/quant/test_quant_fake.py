"""fake_quantize goes through exactly the numpy quantize/dequantize used for export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moec.core.errors import MoecError
from moec.quant import dequantize, fake_quantize, quantize


@pytest.fixture(scope="module")
def weight():
    return torch.randn(16, 128, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["rtn", "mse", "hqq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_equals_numpy_path(weight, bits, method):
    out = fake_quantize(weight, bits, 32, method=method)
    assert out.dtype == torch.float32 and out.shape == weight.shape
    ref = dequantize(quantize(weight.numpy(), bits, 32, method=method))
    np.testing.assert_array_equal(out.numpy(), ref)


def test_half_input_and_importance(weight):
    imp = torch.rand(128, generator=torch.Generator().manual_seed(1))
    out = fake_quantize(weight.half(), 3, 64, method="mse", importance=imp)
    ref = dequantize(quantize(weight.half().float().numpy(), 3, 64, method="mse",
                              importance=imp.numpy()))
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), ref)


def test_requires_grad_input_is_detached(weight):
    w = weight.clone().requires_grad_(True)
    out = fake_quantize(w, 4, 32)
    assert not out.requires_grad


def test_bits16_keeps_float(weight):
    assert fake_quantize(weight, 16, 32) is weight


def test_errors(weight):
    with pytest.raises(MoecError, match="choices"):
        fake_quantize(weight, 7, 32)
    with pytest.raises(MoecError, match="group_size"):
        fake_quantize(weight, 4, 48)
    with pytest.raises(MoecError, match="torch.Tensor"):
        fake_quantize(weight.numpy(), 4, 32)
