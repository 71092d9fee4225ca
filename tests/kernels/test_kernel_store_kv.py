"""store_kv: Triton scatter into the paged cache == the torch reference, -1 slots skipped."""

import pytest
import torch
from kernel_testing import DTYPES, randn, rounding_tol

from llmengine_runtime.kernels.store_kv import store_kv_ref, store_kv_triton


@pytest.mark.parametrize(
    "num_kv_heads, head_dim, block_size, src_dtype, cache_dtype, fused",
    [
        (2, 64, 16, "fp16", "fp16", False),
        (1, 80, 32, "bf16", "bf16", True),   # MQA, head_dim not a power of two, k/v views of a fused qkv
        (3, 64, 16, "fp32", "bf16", False),  # converts to the cache dtype
        (4, 128, 16, "fp32", "fp32", True),
    ],
)
def test_store_kv_matches_reference(device, num_kv_heads, head_dim, block_size, src_dtype, cache_dtype, fused):
    gen = torch.Generator().manual_seed(0)
    src_dtype, cache_dtype = DTYPES[src_dtype], DTYPES[cache_dtype]
    num_tokens, num_blocks = 9, 6
    if fused:  # k and v as strided slices of one [tokens, q + k + v] projection, as models produce them
        qkv = randn(num_tokens, 2 + 2 * num_kv_heads, head_dim, dtype=src_dtype, device=device, gen=gen)
        k, v = qkv[:, 2:2 + num_kv_heads], qkv[:, 2 + num_kv_heads:]
    else:
        k = randn(num_tokens, num_kv_heads, head_dim, dtype=src_dtype, device=device, gen=gen)
        v = randn(num_tokens, num_kv_heads, head_dim, dtype=src_dtype, device=device, gen=gen)
    # Distinct slots in shuffled blocks, first and last slot of a block included, and skipped tokens.
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[0], slots[1] = 0, num_blocks * block_size - 1
    slots[[3, 7]] = -1
    slot_mapping = slots.to(device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()

    store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    store_kv_ref(k, v, k_expected, v_expected, slot_mapping)

    tol = rounding_tol(cache_dtype) if src_dtype != cache_dtype else 0.0
    torch.testing.assert_close(k_cache, k_expected, atol=0, rtol=tol, equal_nan=True)
    torch.testing.assert_close(v_cache, v_expected, atol=0, rtol=tol, equal_nan=True)
    assert int((~k_cache.isnan()).sum()) == 7 * num_kv_heads * head_dim  # exactly the kept tokens
