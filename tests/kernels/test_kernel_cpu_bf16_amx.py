"""bf16 weights on AMX tiles (kernels/cpu/bf16_amx.cpp, models/float_linear.py's `tile_bf16`): the layout and its
inverse everywhere; where the build and CPU have AMX-BF16, the products against float64 on fresh random inputs
(ragged row counts beside whole 16-row tiles and pairs of them, K not a multiple of 32, one column tile and many,
biases), the same bits for a row alone or in any batch and on any thread count, and the layout chosen at load time
(tests/models/test_float_linear.py runs a model's C++ step over thread shares that cut column tiles). Where there is no
AMX-BF16 the kernel tests skip (the vector path is tested in test_kernel_cpu_float.py)."""

import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.models.float_linear import FloatLinear, amx_bf16_tiles, deinterleave_float, tile_bf16
from tests.fast import fast_subset

ops = torch.ops.llmengine_cpu


@pytest.fixture
def tiles():
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"
    if not amx_bf16_tiles():
        pytest.skip("no AMX-BF16 here: this build or CPU has none, Linux did not grant it, or LLMENGINE_AMX=0")


@pytest.mark.parametrize("n, k", [(16, 1), (32, 37), (48, 576)])
def test_layout_round_trip(n, k):
    w = torch.randn(n, k)
    t = tile_bf16(w)
    assert t.shape == (n // 16, -(-k // 32), 512) and t.dtype == torch.bfloat16
    assert torch.equal(deinterleave_float(t, k), w.to(torch.bfloat16))
    u = t.shape[1] - 1
    for tile, r, col, h in [(0, 0, 0, 0), (n // 16 - 1, 5, 11, 1), (n // 16 - 1, 0, 15, 0)]:
        kk = 32 * u + 2 * r + h  # [t, u, 32r + 2n + h] = W[16t + n, 32u + 2r + h]
        want = w[16 * tile + col, kk].to(torch.bfloat16) if kk < k else torch.tensor(0, dtype=torch.bfloat16)
        assert torch.equal(t[tile, u, 32 * r + 2 * col + h], want)
    with pytest.raises(ValueError, match="multiple of 16"):
        tile_bf16(torch.randn(24, k))


@pytest.mark.parametrize("rows", fast_subset([1, 5, 16, 17, 33, 70], [1, 17, 70]))
@pytest.mark.parametrize("n, k", [(16, 1), (48, 37), (64, 100), (1536, 576), (32, 1000)])
def test_against_float64(tiles, rows, n, k):
    gen = torch.Generator().manual_seed(rows * 10000 + n * 10 + k)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    bias = torch.randn(n, generator=gen) if rows % 2 else None
    got = ops.float_linear(x, tile_bf16(w), bias)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    xs, ws = x.to(torch.bfloat16).double(), w.to(torch.bfloat16).double()
    want = xs @ ws.T + (0 if bias is None else bias.double())
    bound = 4 * k * 2 ** -24 * (xs.abs() @ ws.abs().T) + 1e-6  # fp32 sums of exact bf16 products
    assert ((got.double() - want).abs() <= bound).all()


def test_a_row_gives_the_same_bits_alone_or_in_any_batch(tiles):
    gen = torch.Generator().manual_seed(7)
    w = tile_bf16(torch.randn(80, 130, generator=gen))
    x = torch.randn(70, 130, generator=gen)
    together = ops.float_linear(x, w, None)
    for i in (0, 3, 33, 69):
        assert torch.equal(ops.float_linear(x[i:i + 1], w, None)[0], together[i])
    assert torch.equal(ops.float_linear(x[5:12], w, None), together[5:12])
    assert torch.equal(ops.float_linear(x[1:50], w, None), together[1:50])  # 3 whole tiles and 1 row
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            assert torch.equal(ops.float_linear(x, w, None), together)
    finally:
        torch.set_num_threads(threads)


def test_the_layout_is_chosen_when_the_weights_load(tiles):
    w, x = torch.randn(32, 40), torch.randn(3, 40)
    on_tiles = FloatLinear(w, None, torch.bfloat16)
    assert on_tiles.tiles and "amx tiles" in repr(on_tiles)
    assert not FloatLinear(torch.randn(24, 40), None, torch.bfloat16).tiles  # N not a multiple of 16
    assert not FloatLinear(w, None, torch.float16).tiles
    want = on_tiles(x)
    before = ops.amx_enabled()
    try:
        ops.set_amx(False)
        assert not FloatLinear(w, None, torch.bfloat16).tiles  # LLMENGINE_AMX=0 at load: interleaved
        assert torch.equal(on_tiles(x), want)  # weights already in tiles still run on them
    finally:
        ops.set_amx(before)
