"""rms_norm (with and without the fused residual add) and layer_norm: Triton vs a float64 reference."""

import pytest
import torch
from kernel_testing import DTYPES, randn, rounding_tol

from llmengine_runtime.kernels.norms import layer_norm_ref, layer_norm_triton, rms_norm_ref, rms_norm_triton

# Relative bounds: the output is rounded once to the dtype (rms_norm twice: before and after the weight).
NORM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CASES = [("fp32", 64, False), ("fp16", 576, True), ("bf16", 4544, False)]  # 576: SmolLM2, 4544: falcon-7b


def inputs(dtype, hidden, strided, device, gen):
    """x `[2, 3, hidden]`; `strided` makes it a column slice (row stride > hidden)."""
    if strided:
        x = randn(2, 3, hidden + 16, dtype=dtype, device=device, gen=gen)[..., 8:hidden + 8]
    else:
        x = randn(2, 3, hidden, dtype=dtype, device=device, gen=gen)
    weight = (1 + 0.5 * randn(hidden, dtype=torch.float32, device=device, gen=gen)).to(dtype)
    return x, weight


@pytest.mark.parametrize("dtype, hidden, strided", CASES)
def test_rms_norm(device, dtype, hidden, strided):
    gen = torch.Generator().manual_seed(1)
    dtype = DTYPES[dtype]
    x, weight = inputs(dtype, hidden, strided, device, gen)
    out = rms_norm_triton(x, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), rms_norm_ref(x.double(), weight.double(), 1e-6),
                               rtol=NORM_TOL[dtype], atol=NORM_TOL[dtype])


@pytest.mark.parametrize("dtype, hidden, strided", CASES)
def test_rms_norm_fused_residual(device, dtype, hidden, strided):
    gen = torch.Generator().manual_seed(2)
    dtype = DTYPES[dtype]
    x, weight = inputs(dtype, hidden, strided, device, gen)
    residual = randn(*x.shape, dtype=dtype, device=device, gen=gen)
    out, h = rms_norm_triton(x, weight, 1e-5, residual)
    # the same rounding as torch's add
    torch.testing.assert_close(h, x + residual, atol=0, rtol=rounding_tol(dtype))
    torch.testing.assert_close(out.double(), rms_norm_ref(h.double(), weight.double(), 1e-5),
                               rtol=NORM_TOL[dtype], atol=NORM_TOL[dtype])


@pytest.mark.parametrize("dtype, hidden, strided", CASES)
def test_layer_norm(device, dtype, hidden, strided):
    gen = torch.Generator().manual_seed(3)
    dtype = DTYPES[dtype]
    x, weight = inputs(dtype, hidden, strided, device, gen)
    x = x + 3.0  # a mean far from 0, so a kernel that skips centring fails
    bias = randn(hidden, dtype=dtype, device=device, gen=gen)
    out = layer_norm_triton(x, weight, bias, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    expected = layer_norm_ref(x.double(), weight.double(), bias.double(), 1e-5)
    torch.testing.assert_close(out.double(), expected, rtol=NORM_TOL[dtype], atol=NORM_TOL[dtype])
