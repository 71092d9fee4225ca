"""Falcon's LayerNorm and GELU C++ kernels (kernels/cpu/falcon_layers.cpp) against float64 references on fresh random
rows: widths around the 8-lane steps (1, 7, 8, 9, 64, 100, 4544), large offsets (the variance after the mean), and a
row's numbers alone = in a batch = on any thread count (the fused step calls the row functions directly)."""

import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.kernels import gelu, layer_norm

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the C++ kernels are not built")


@pytest.mark.parametrize("hidden", [1, 7, 8, 9, 64, 100, 4544])
def test_layer_norm_matches_float64(hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(13, hidden, generator=gen) * 3 + torch.randn(13, 1, generator=gen) * 50  # offsets per row
    w, b = torch.randn(hidden, generator=gen), torch.randn(hidden, generator=gen)
    got = torch.ops.llmengine_cpu.layer_norm(x, w, b, 1e-5)
    x64 = x.double()
    expected = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = expected * w.double() + b.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-5)
    assert torch.equal(layer_norm(x, w, b, 1e-5), got)  # the eager path's entry point takes the kernel


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 4544])
def test_gelu_matches_float64(n):
    gen = torch.Generator().manual_seed(100 + n)
    x = torch.randn(5, n, generator=gen) * 4
    x[0, 0] = 0.0
    got = torch.ops.llmengine_cpu.gelu(x)
    x64 = x.double()
    expected = 0.5 * x64 * (1 + torch.erf(x64 / 2**0.5))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(gelu(x), got)


def test_rows_do_not_depend_on_the_batch_or_threads():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(33, 200, generator=gen)
    w, b = torch.randn(200, generator=gen), torch.randn(200, generator=gen)
    ops = torch.ops.llmengine_cpu
    norm_all, gelu_all = ops.layer_norm(x, w, b, 1e-5), ops.gelu(x)
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            assert torch.equal(ops.layer_norm(x, w, b, 1e-5), norm_all) and torch.equal(ops.gelu(x), gelu_all)
    finally:
        torch.set_num_threads(threads)
    for r in (0, 17, 32):
        assert torch.equal(ops.layer_norm(x[r:r + 1], w, b, 1e-5), norm_all[r:r + 1])
        assert torch.equal(ops.gelu(x[r:r + 1, 3:]), gelu_all[r:r + 1, 3:])  # elementwise: any start


def test_bad_inputs_name_what_is_accepted():
    ops = torch.ops.llmengine_cpu
    with pytest.raises(RuntimeError, match=r"weight and bias must be fp32 \[8\]"):
        ops.layer_norm(torch.randn(2, 8), torch.randn(7), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="CPU fp32"):
        ops.gelu(torch.randn(2, 8, dtype=torch.float64))
