"""The q4 and q8 GEMM micro-kernels with eight weight rows interleaved (kernels/cpu/q4_interleaved.cpp,
q8_interleaved.cpp): against float64 on fresh random weights and activations (ragged row counts, K of one block and
of several, biases), the same bits for a row alone or in any batch and on any thread count, and the layouts' round
trips (models/row_interleave.py)."""

import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.kernels.cpu.reference import int8_blocks
from llmengine_runtime.kernels.quant_matmul import pack_int4
from llmengine_runtime.models.quantized_linear import QuantizedLinear
from llmengine_runtime.models.row_interleave import deinterleave8, deinterleave8_q8, interleave8, interleave8_q8

ops = torch.ops.llmengine_cpu


@pytest.fixture(autouse=True, scope="module")
def built():
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"


def random_q4(n: int, k: int, gen: torch.Generator):
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02).half()
    m = (torch.randn(n, k // 32, generator=gen) * 0.05).half()
    return q, d, m


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 64, 65, 130])
@pytest.mark.parametrize("n", [8, 56])
@pytest.mark.parametrize("k", [32, 96, 576])
def test_against_float64(rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    q, d, m = random_q4(n, k, gen)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    bias = torch.randn(n, generator=gen)
    xq, xd = (t.double() for t in int8_blocks(x))
    qb = q.view(n, -1, 32).double()
    expected = torch.einsum("mbj,nbj,nb,mb->mn", xq, qb, d.double(), xd) \
        + torch.einsum("mbj,nb,mb->mn", xq, m.double(), xd) + bias.double()
    y = ops.q4x8_linear(x, *interleave8(pack_int4(q), d, m), bias)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_row_gets_the_same_bits_in_any_batch_and_thread_count():
    gen = torch.Generator().manual_seed(7)
    q, d, m = random_q4(200, 576, gen)
    packed = interleave8(pack_int4(q), d, m)
    x = torch.randn(70, 576, generator=gen)
    batch = ops.q4x8_linear(x, *packed, None)
    for i in (0, 3, 4, 63, 64, 69):
        assert torch.equal(ops.q4x8_linear(x[i:i + 1], *packed, None), batch[i:i + 1]), i
    assert torch.equal(ops.q4x8_linear(x[5:12], *packed, None), batch[5:12])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.q4x8_linear(x, *packed, None), batch)
    finally:
        torch.set_num_threads(threads)


def test_layout_round_trip_and_refusals():
    gen = torch.Generator().manual_seed(3)
    q, d, m = random_q4(24, 96, gen)
    qs = pack_int4(q)
    packed = interleave8(qs, d, m)
    assert [tuple(t.shape) for t in packed] == [(3, 3, 128), (3, 3, 8), (3, 3, 8)]
    assert packed[0][1, 2, 32 * 3 + 4 * 5 + 2] == qs[8 + 5, 16 * 2 + 4 * 3 + 2]  # [g, b, 32c + 4j + i]
    for got, want in zip(deinterleave8(*packed), (qs, d, m)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"multiple\s+of 8"):
        interleave8(qs[:20], d[:20], m[:20])
    with pytest.raises(RuntimeError, match=r"fp16 \[3, 3, 8\]"):
        ops.q4x8_linear(torch.randn(1, 96), packed[0], packed[1].float(), packed[2], None)
    with pytest.raises(RuntimeError, match="blocks of 32"):
        ops.q4x8_linear(torch.randn(1, 200), *packed, None)


@pytest.mark.parametrize("n", [64, 60])  # interleaved, and rows in order (N not a multiple of 8)
def test_quantized_linear_keeps_its_weight_either_way(n):
    gen = torch.Generator().manual_seed(n)
    w, x = torch.randn(n, 128, generator=gen), torch.randn(9, 128, generator=gen)
    layer = QuantizedLinear.quantize(w, torch.randn(n, generator=gen), "int4", 32)
    if layer.backend != "cpu":
        pytest.fail("the C++ kernels are built, so int4 layers must use them")
    assert layer.w_int4.dim() == (3 if n % 8 == 0 else 2)
    weight = layer.dequantize()
    assert (weight - w).abs().max() < 0.3  # the stored weight is w, quantized (a step of ~0.4 here)
    if n % 8 == 0:  # the same stored integers through the rows-in-order kernel: only the float order differs
        in_order = ops.q4_linear(x, *deinterleave8(layer.w_int4, layer.d, layer.m), layer.bias)
        torch.testing.assert_close(layer(x), in_order, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 5, 16, 65])
@pytest.mark.parametrize("n", [8, 56])
@pytest.mark.parametrize("k", [32, 96, 576])
def test_q8_against_float64(rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n * 10 + k + 1)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)  # -128 too: the sign trick's edge
    d = (torch.rand(n, k // 32, generator=gen) * 0.01).half()
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    bias = torch.randn(n, generator=gen)
    xq, xd = (t.double() for t in int8_blocks(x))
    expected = torch.einsum("mbj,nbj,nb,mb->mn", xq, q.view(n, -1, 32).double(), d.double(), xd) + bias.double()
    y = ops.q8x8_linear(x, *interleave8_q8(q, d), bias)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    batch_of_one = torch.cat([ops.q8x8_linear(x[i:i + 1], *interleave8_q8(q, d), bias) for i in range(rows)])
    assert torch.equal(batch_of_one, y)


def test_q8_layout_round_trip_and_refusals():
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-128, 128, (16, 64), generator=gen, dtype=torch.int8)
    d = torch.rand(16, 2, generator=gen).half()
    packed = interleave8_q8(q, d)
    assert [tuple(t.shape) for t in packed] == [(2, 2, 256), (2, 2, 8)]
    assert packed[0][1, 1, 32 * 6 + 4 * 3 + 1] == q[8 + 3, 32 + 4 * 6 + 1]  # [g, b, 32c + 4j + i]
    for got, want in zip(deinterleave8_q8(*packed), (q, d)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"multiple\s+of 8"):
        interleave8_q8(q[:12], d[:12])
    with pytest.raises(RuntimeError, match=r"int8 \[N / 8, nb, 256\]"):
        ops.q8x8_linear(torch.randn(1, 64), packed[0].view(torch.uint8), packed[1], None)


@pytest.mark.parametrize("n", [64, 60])
def test_int8_layer_either_layout(n):
    gen = torch.Generator().manual_seed(n + 1)
    w, x = torch.randn(n, 100, generator=gen), torch.randn(9, 100, generator=gen)  # K = 100: padded to 128
    layer = QuantizedLinear.quantize(w, None, "int8")  # per output channel
    assert layer.backend == "cpu" and layer.w_int8.dim() == (3 if n % 8 == 0 else 2)
    assert (layer.dequantize() - w).abs().max() < 0.02
    if n % 8 == 0:
        in_order = ops.q8_linear(x, *deinterleave8_q8(layer.w_int8, layer.d), None)
        torch.testing.assert_close(layer(x), in_order, rtol=1e-5, atol=1e-5)
