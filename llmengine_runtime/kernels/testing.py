"""Inputs for checking the kernels against their references: a paged KV cache whose unused slots are
poisoned, so a kernel that reads outside a sequence's tokens gets a visibly wrong answer. Used by the
kernel tests (under the interpreter) and by `make gpu-check` (on CUDA)."""

from __future__ import annotations

import torch

# Unused cache slots and the padding block hold this: a kernel that reads one gets a large score for it.
POISON = 100.0


def make_paged_cache(cached_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                     dtype: torch.dtype, device: torch.device | str, gen: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k_cache, v_cache `[num_blocks, block_size, num_kv_heads, head_dim]` and int32 block_tables where
    sequence i's first cached_lens[i] tokens hold random values, spread over shuffled (non-contiguous)
    physical blocks. Every other slot, and the block that pads the tables, hold POISON."""
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
        for cache in (k_cache, v_cache):
            cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen,
                                                                        dtype=torch.float32).to(dtype)
    return k_cache.to(device), v_cache.to(device), block_tables.to(device)
