"""Shared pieces of the kernel tests: error bounds and a paged cache with poisoned unused slots."""

import os

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Attention outputs (|out| <~ 3) against a float64 reference: fp32 runs tf32x3 on GPUs (~1e-6);
# 16-bit inputs also round the softmax weights before the PV product.
ATTN_TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# The triton 3.9 interpreter truncates fp32 -> bf16 casts (compiled kernels round to nearest even), so a
# value the kernel rounds to bf16 may sit one bf16 ulp (2^-7 relative) off torch's rounding there.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def rounding_tol(dtype: torch.dtype) -> float:
    """Relative bound for a value computed in fp32 and rounded once to dtype: 0 (the same rounding as
    torch) unless the interpreter's bf16 truncation is at play."""
    return 2.0 ** -7 if INTERPRETED and dtype == torch.bfloat16 else 0.0


# Unused cache slots and the padding block hold this: a kernel that reads one gets a large score for it.
POISON = 100.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert not actual.isnan().any(), f"{int(actual.isnan().sum())} NaN elements (unwritten output?)"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol, rtol=tol)


def make_paged_cache(cached_lens, num_kv_heads, head_dim, block_size, dtype, device, gen):
    """k_cache, v_cache and int32 block_tables where sequence i's first cached_lens[i] tokens hold random
    values, spread over shuffled (non-contiguous) physical blocks. Every other slot, and the block that
    pads the tables, hold POISON."""
    blocks_per_seq = [(n + block_size - 1) // block_size for n in cached_lens]
    num_blocks = sum(blocks_per_seq) + 3
    physical = torch.randperm(num_blocks, generator=gen)
    pad_block = int(physical[-1])
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.full((len(cached_lens), max_blocks), pad_block, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, POISON, dtype=dtype)
    v_cache = torch.full(shape, POISON, dtype=dtype)
    used = 0
    for i, (n, nb) in enumerate(zip(cached_lens, blocks_per_seq)):
        block_tables[i, :nb] = physical[used:used + nb]
        used += nb
        pos = torch.arange(n)
        slots = block_tables[i, pos // block_size].long() * block_size + pos % block_size
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen,
                                                                      dtype=torch.float32).to(dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen,
                                                                      dtype=torch.float32).to(dtype)
    return k_cache.to(device), v_cache.to(device), block_tables.to(device)


def alibi_slopes(num_heads: int, device) -> torch.Tensor:
    """The ALiBi slopes 2^(-8 (h + 1) / H), as falcon-rw / BLOOM use for a power-of-two H."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)], device=device)


def randn(*shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(device)
