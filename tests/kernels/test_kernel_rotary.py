"""rotary: Triton rotate-half embedding vs a float64 reference; inputs left untouched."""

import math

import pytest
import torch
from kernel_testing import DTYPES, randn

from llmengine_runtime.kernels.rotary import rotary_ref, rotary_triton

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def cos_sin_cache(max_positions: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


@pytest.mark.parametrize(
    "dtype, num_heads, num_kv_heads, head_dim, fused",
    [("fp32", 8, 2, 64, False), ("fp16", 71, 1, 64, True), ("bf16", 4, 4, 80, True)],
)
def test_rotary(device, dtype, num_heads, num_kv_heads, head_dim, fused):
    gen = torch.Generator().manual_seed(4)
    dtype = DTYPES[dtype]
    num_tokens = 5
    if fused:  # q and k as strided views of one projection
        qkv = randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
        q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    else:
        q = randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device, gen=gen)
        k = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    q_before, k_before = q.clone(), k.clone()
    positions = torch.tensor([0, 7, 3, 100, 2047]).to(device)
    cache = cos_sin_cache(2048, head_dim).to(device)

    q_out, k_out = rotary_triton(q, k, positions, cache)

    q_ref, k_ref = rotary_ref(q.double(), k.double(), positions, cache.double())
    torch.testing.assert_close(q_out.double(), q_ref, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(k_out.double(), k_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    # position 0 is the identity; a rotation keeps each pair's norm
    torch.testing.assert_close(q_out[0], q[0], atol=0, rtol=0)
    pair_norm = lambda x: x.double().unflatten(-1, (2, -1)).pow(2).sum(-2)
    assert math.isclose(float(pair_norm(k_out).sum()), float(pair_norm(k).sum()), rel_tol=1e-2)
