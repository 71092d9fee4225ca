"""A fixed pool of KV-cache blocks, handed out to sequences with reference counts.

A block holds `block_size` consecutive tokens of one sequence (K and V of every layer). A sequence's
`block_table` lists its blocks in order; token t lives in slot `block_table[t // block_size] * block_size
+ t % block_size`. Every block is either free (reference count 0, in the free list) or used (count > 0):
`check()` asserts that, and that free + used == total.
"""

from __future__ import annotations

from collections import deque

import torch

from models.config import ModelConfig
from runtime.sequence import Sequence

GiB = 1 << 30


def kv_block_bytes(config: ModelConfig, dtype: torch.dtype, block_size: int) -> int:
    """Bytes of one block: K and V, every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element


def num_blocks_for_budget(config: ModelConfig, dtype: torch.dtype, block_size: int, device: torch.device,
                          kv_cache_gib: float | None, gpu_memory_utilization: float,
                          reserve_bytes: int = 0) -> int:
    """Blocks that fit the budget: `kv_cache_gib` when given (default 1 GiB on CPU); on CUDA otherwise
    `gpu_memory_utilization` of the free memory (after the model is loaded) minus `reserve_bytes` for
    activations."""
    if kv_cache_gib is not None:
        budget = kv_cache_gib * GiB
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * gpu_memory_utilization - reserve_bytes
    else:
        budget = 1 * GiB
    num_blocks = int(budget // kv_block_bytes(config, dtype, block_size))
    if num_blocks < 1:
        raise ValueError(f"KV cache budget of {budget / GiB:.3f} GiB holds no block of {block_size} tokens "
                         f"({kv_block_bytes(config, dtype, block_size)} bytes); raise kv_cache_gib or "
                         "gpu_memory_utilization")
    return num_blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, cache_salt: str = ""):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.cache_salt = cache_salt
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_ids)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` tokens (first allocation and appends alike)."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free_ids):
            raise RuntimeError(f"out of KV blocks: need {needed}, {len(self.free_ids)} free")
        for _ in range(needed):
            block = self.free_ids.popleft()
            assert self.ref_counts[block] == 0
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s reference to each of its blocks; blocks nobody references go back to the pool."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_ids.append(block)
        seq.block_table.clear()

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of `seq`'s full, computed blocks (prefix caching; not built yet)."""

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_queries": 0, "prefix_cache_hits": 0}

    def check(self, live: list[Sequence] | None = None) -> None:
        """Assert exact accounting; with `live` (every sequence holding blocks), that the reference
        counts are exactly the number of block tables holding each block."""
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is in the free list twice"
        used = {b for b in range(self.num_blocks) if self.ref_counts[b] > 0}
        assert not (free & used), f"blocks both free and used: {sorted(free & used)[:5]}"
        assert len(free) + len(used) == self.num_blocks, "blocks neither free nor used"
        if live is not None:
            counts = [0] * self.num_blocks
            for seq in live:
                for block in seq.block_table:
                    counts[block] += 1
            assert counts == self.ref_counts, "reference counts differ from the live block tables"
