"""`llmengine_cpu::gguf_linear` (kernels/cpu/gguf_*.cpp): every GGUF quantized type's product on random valid blocks
(finite fp16 scales, every other byte random: 6-bit scales and mins, high bits, signs), held against a float64
product of gguf-py's own dequantizer and the activations quantized as the kernel does; against the unquantized x
within the activation-rounding bound; and bit for bit against itself across row counts, thread counts, and the
portable (scalar) path."""

import gguf
import numpy as np
import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels

ops = torch.ops.llmengine_cpu
T = gguf.GGMLQuantizationType
# type -> (elements per block, bytes per block, byte offsets of the block's fp16 scales)
BLOCKS = {
    T.Q4_0: (32, 18, [0]), T.Q4_1: (32, 20, [0, 2]), T.Q5_0: (32, 22, [0]), T.Q5_1: (32, 24, [0, 2]),
    T.Q8_0: (32, 34, [0]), T.Q2_K: (256, 84, [80, 82]), T.Q3_K: (256, 110, [108]), T.Q4_K: (256, 144, [0, 2]),
    T.Q5_K: (256, 176, [0, 2]), T.Q6_K: (256, 210, [208]),
}
TYPES = list(BLOCKS)


@pytest.fixture(autouse=True, scope="module")
def built():
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"


def random_weight(qtype: T, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, row_bytes]: random bytes, with each block's fp16 scales set to finite values of either sign."""
    elems, size, scales = BLOCKS[qtype]
    w = torch.randint(0, 256, (n, k // elems, size), generator=gen, dtype=torch.uint8)
    for offset in scales:
        sign = torch.randn(n, k // elems, generator=gen).sign()
        d = (torch.rand(n, k // elems, generator=gen) + 0.05) * 0.02 * sign
        w[..., offset:offset + 2] = d.half().view(torch.uint8).view(n, k // elems, 2)
    return w.view(n, -1)


def dequantized(w: torch.Tensor, qtype: T) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(w.numpy(), qtype).astype(np.float64))


def quantized_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel multiplies by, in fp32 as it computes it: xd = max|x| / 127, xq = round-half-even(x * (1 / xd))
    per block. Returns xq * xd as float64 [M, K] and xd per element."""
    xb = x.unflatten(-1, (-1, block))
    xd = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(xb * torch.where(xd > 0, 1 / xd, torch.zeros_like(xd)))
    assert xq.abs().max() <= 127
    return (xq.double() * xd.double()).flatten(-2), xd.double().expand_as(xb).flatten(-2)


def case(qtype: T, m: int, n: int, blocks: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    k = blocks * BLOCKS[qtype][0]
    w = random_weight(qtype, n, k, gen)
    x = torch.randn(m, k, generator=gen) * (torch.rand(m, 1, generator=gen) * 4 + 0.1)
    x[:, : k // 3] *= 0.01  # blocks of very different scales within a row
    return x, w, k


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 4, 5, 17])
def test_matches_gguf_dequantize(qtype, m):
    """Tight: against float64 (quantized x) @ (gguf-py's dequantized w).T + bias, the kernel's only error is its fp32
    arithmetic. Loose: against the unquantized x, within sum_k |w| xd / 2 (each xq rounds by at most half a step).
    K = 13 blocks for the 32-element types, 9 for the K types (a group of 8 blocks and a tail); N ragged."""
    blocks = 13 if BLOCKS[qtype][0] == 32 else 9
    x, w, k = case(qtype, m, 37, blocks, seed=int(qtype) * 100 + m)
    bias = torch.randn(37)
    y = ops.gguf_linear(x, w, int(qtype), k, bias)
    assert y.shape == (m, 37) and y.dtype == torch.float32
    wd = dequantized(w, qtype)
    xf, xd = quantized_activations(x, BLOCKS[qtype][0])
    expected = xf @ wd.T + bias.double()
    scale = xf.abs() @ wd.abs().T + bias.double().abs()
    err = (y.double() - expected).abs()
    assert (err <= 1e-5 * scale + 1e-7).all(), f"worst relative error {(err / scale).max():.2e}"
    rounding = (xd / 2) @ wd.abs().T * (1 + 1e-4) + 1e-5 * (x.double().abs() @ wd.abs().T + 1)
    assert ((y.double() - (x.double() @ wd.T + bias.double())).abs() <= rounding).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_and_threads_do_not_change_a_bit(qtype):
    """Each output's bits depend on its own row and K only: M = 17 at once (tiles of 4, then 1) equals each row
    alone, 1 thread equals 2, and the portable scalar path equals the fast one (AVX2 / VNNI where built in)."""
    blocks = 21 if BLOCKS[qtype][0] == 32 else 19  # 2 groups of 8 blocks and a tail
    x, w, k = case(qtype, 17, 45, blocks, seed=int(qtype))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = ops.gguf_linear(x, w, int(qtype), k, None)
        torch.set_num_threads(1)
        y1 = ops.gguf_linear(x, w, int(qtype), k, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, y1)
    for i in [0, 3, 4, 5, 16]:
        assert torch.equal(ops.gguf_linear(x[i:i + 1], w, int(qtype), k, None), y[i:i + 1])
    for rows in [slice(0, 3), slice(2, 7), slice(0, 17)]:
        assert torch.equal(ops.gguf_linear(x[rows], w, int(qtype), k, None), y[rows])
        assert torch.equal(ops.gguf_linear_portable(x[rows], w, int(qtype), k, None), y[rows])


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_real_gguf_quantization(qtype):
    """Blocks from gguf-py's own quantizer where it has one (Q4_0, Q8_0 ...), else random: the product of a real-ish
    weight stays within the activation-rounding bound of the float64 product with the dequantized weight."""
    gen = torch.Generator().manual_seed(7)
    k, n = 512, 24
    weight = torch.randn(n, k, generator=gen, dtype=torch.float64).float().numpy()
    try:
        w = torch.from_numpy(gguf.quants.quantize(weight, qtype))
    except NotImplementedError:
        w = random_weight(qtype, n, k, gen)
    x = torch.randn(2, k, generator=gen)
    wd = dequantized(w, qtype)
    xf, _ = quantized_activations(x, BLOCKS[qtype][0])
    torch.testing.assert_close(ops.gguf_linear(x, w, int(qtype), k, None).double(), xf @ wd.T, rtol=1e-5, atol=1e-5)


def test_supported_types():
    assert all(ops.gguf_linear_supported(int(t)) for t in TYPES)
    assert not any(ops.gguf_linear_supported(int(t)) for t in [T.F32, T.F16, T.BF16, T.IQ4_NL, T.Q8_K, 99])


def test_bad_inputs_say_what_is_wrong():
    x, w, k = case(T.Q4_K, 2, 8, 2, seed=0)
    with pytest.raises(RuntimeError, match="ggml type 1 is not supported; supported: Q4_0 \\(2\\)"):
        ops.gguf_linear(x, w, int(T.F16), k, None)
    with pytest.raises(RuntimeError, match="w must be uint8 \\[N, 288\\]"):
        ops.gguf_linear(x, w[:, :-1], int(T.Q4_K), k, None)
    with pytest.raises(RuntimeError, match="w must be uint8"):
        ops.gguf_linear(x, w.view(torch.int8), int(T.Q4_K), k, None)
    with pytest.raises(RuntimeError, match="not a multiple of Q4_K's block of 256"):
        ops.gguf_linear(x[:, :300], w, int(T.Q4_K), 300, None)
    with pytest.raises(RuntimeError, match="x must be \\[M, K=512\\]"):
        ops.gguf_linear(x[:, :256], w, int(T.Q4_K), k, None)
    with pytest.raises(RuntimeError, match="bias must be \\[N=8\\]"):
        ops.gguf_linear(x, w, int(T.Q4_K), k, torch.zeros(7))
