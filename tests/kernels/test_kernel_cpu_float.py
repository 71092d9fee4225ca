"""The float-weight product with eight rows interleaved (kernels/cpu/float_interleaved.cpp): fp32, fp16 and bf16
weights against float64 on fresh random inputs (ragged row counts, K not a multiple of 4, one group and several,
biases), the same bits for a row alone or in any batch and on any thread count, the layout's round trip
(models/float_linear.py), and clear errors for a tensor not in the layout."""

import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.models.float_linear import FloatLinear, deinterleave_float, interleave_float
from tests.fast import fast_subset

ops = torch.ops.llmengine_cpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def built():
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"


def expected(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 of what the product reads: w in `dtype`; x as it is, or rounded to bf16 for bf16 weights."""
    xs = x.to(torch.bfloat16) if dtype == torch.bfloat16 else x
    y = xs.double() @ w.to(dtype).double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", fast_subset([1, 3, 4, 5, 16, 65], [1, 5, 65]))
@pytest.mark.parametrize("n, k", [(8, 4), (16, 37), (56, 576), (24, 1538)])
def test_against_float64(dtype, rows, n, k):
    gen = torch.Generator().manual_seed(rows * 10000 + n * 10 + k)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    bias = torch.randn(n, generator=gen) if rows % 2 else None
    got = ops.float_linear(x, interleave_float(w, dtype), bias)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    want = expected(x, w, dtype, bias)
    # fp32 sums of k products, each exact or within one rounding: ~k * eps * sum |x w| at worst
    bound = 4 * k * 2 ** -24 * (x.abs().double() @ w.to(dtype).abs().double().T) + 1e-6
    assert ((got.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gives_the_same_bits_alone_or_in_any_batch(dtype):
    gen = torch.Generator().manual_seed(7)
    w = interleave_float(torch.randn(40, 130, generator=gen), dtype)
    x = torch.randn(70, 130, generator=gen)
    together = ops.float_linear(x, w, None)
    for i in (0, 3, 69):
        assert torch.equal(ops.float_linear(x[i:i + 1], w, None)[0], together[i])
    assert torch.equal(ops.float_linear(x[5:12], w, None), together[5:12])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.float_linear(x, w, None), together)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [4, 37, 576])
def test_layout_round_trip(dtype, k):
    w = torch.randn(24, k)
    rows = interleave_float(w, dtype)
    assert rows.shape == (3, -(-k // 4), 32) and rows.dtype == dtype
    assert torch.equal(deinterleave_float(rows, k), w.to(dtype))
    c = rows.shape[1] - 1
    assert torch.equal(rows[1, c, 4 * 5], w[8 + 5, 4 * c].to(dtype))  # [g, c, 4j + i] = W[8g + j, 4c + i]


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_linear_module(dtype):
    w, b = torch.randn(16, 20), torch.randn(16)
    layer = FloatLinear(w, b, dtype)
    assert layer.w_bits.dtype in (torch.int16, torch.int32)  # bits: model.to(dtype) leaves them alone
    layer.to(torch.float64)
    assert layer.w_rows.dtype == dtype and torch.equal(layer.dequantize(), w.to(dtype).float())
    x = torch.randn(2, 3, 20)
    y = layer(x)
    assert y.shape == (2, 3, 16)
    assert torch.equal(y.view(6, 16), ops.float_linear(x.reshape(6, 20), layer.w_rows, layer.bias))


def test_shapes_for_torch_compile():
    """The fake kernels torch.compile traces with (kernels/cpu/__init__.py), for the interleaved products too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(2, 5, 32, dtype=torch.bfloat16)
        y = ops.float_linear(torch.empty(3, 20, dtype=torch.bfloat16), w, None)
        q4 = ops.q4x8_linear(torch.empty(3, 64), torch.empty(2, 2, 128, dtype=torch.uint8),
                             torch.empty(2, 2, 8, dtype=torch.half), torch.empty(2, 2, 8, dtype=torch.half), None)
        q8 = ops.q8x8_linear(torch.empty(3, 64), torch.empty(2, 2, 256, dtype=torch.int8),
                             torch.empty(2, 2, 8, dtype=torch.half), None)
    assert (y.shape, y.dtype) == ((3, 16), torch.float32)
    assert q4.shape == q8.shape == (3, 16)


def test_errors_name_the_layout():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"\[N / 8, K4 / 4, 32\]"):
        ops.float_linear(x, torch.zeros(8, 8, dtype=torch.bfloat16), None)
    with pytest.raises(RuntimeError, match="fp32, fp16 or bf16"):
        ops.float_linear(x, torch.zeros(1, 2, 32, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="K=8 but the weight has 4 columns"):
        ops.float_linear(x, torch.zeros(1, 1, 32), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.float_linear(x, torch.zeros(1, 2, 32), torch.zeros(3))
    with pytest.raises(ValueError, match="multiple of 8"):
        interleave_float(torch.zeros(12, 8), torch.bfloat16)
