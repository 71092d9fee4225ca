"""A fixed pool of KV-cache blocks, handed out to sequences with reference counts, and the prefix cache.

A block holds `block_size` consecutive tokens of one sequence (K and V of every layer). A sequence's
`block_table` lists its blocks in order; token t lives in slot `block_table[t // block_size] * block_size
+ t % block_size`.

Prefix caching: once a block is full and all its tokens are computed, `cache_full_blocks` registers it
under a chained hash, digest(parent's digest, its token ids), the first block's parent being a digest of
`cache_salt` (the model and dtype). A new sequence then shares the longest run of registered blocks
that starts its tokens (`cached_prefix`, `reuse`) instead of recomputing them. Each registered block also
records its token ids and its parent block, and a hit must match both: a hash collision gives a miss,
never foreign K/V. (A registered block's parent is always registered, since every table that holds a
block holds its parent just before it, and children are freed, hence evicted, first.)

Every block is in exactly one state:
- used: reference count > 0 (held by that many block tables);
- free: count 0, unregistered, in `free_ids`;
- evictable: count 0 but still registered, in `evictable` (least recently freed first). It counts as
  free; allocation takes free blocks first, then evicts the oldest evictable one (dropping its hash).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

import torch

from llmengine_runtime.models.config import ModelConfig
from llmengine_runtime.runtime.sequence import Sequence

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


def block_hash(parent: bytes, token_ids: tuple[int, ...]) -> bytes:
    """The chained digest of a full block: its parent's digest and its token ids (as int64)."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


ROOT = -1  # the parent of a sequence's first block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, cache_salt: str = ""):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = hashlib.blake2b(cache_salt.encode(), digest_size=16).digest()
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        # What a registered block holds: its digest, token ids and parent block (all None when unregistered).
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.parent_of: list[int | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # digest -> registered block
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free and evictable."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] | None = None) -> bool:
        """Whether `seq` can grow to `num_tokens` tokens; with `prefix` (from `cached_prefix`), after reusing
        it (an evictable block of the prefix stops counting as free)."""
        prefix = prefix or []
        needed = max(0, -(-num_tokens // self.block_size) - len(seq.block_table) - len(prefix))
        revived = sum(1 for block in prefix if self.ref_counts[block] == 0)
        return needed <= self.num_free - revived

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` tokens (first allocation and appends alike)."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {needed}, {self.num_free} free")
        for _ in range(needed):
            if self.free_ids:
                block = self.free_ids.popleft()
            else:
                block, _ = self.evictable.popitem(last=False)
                self._unregister(block)
            assert self.ref_counts[block] == 0
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Give back `seq`'s blocks that lie entirely past its first `num_tokens` tokens, last first (speculative
        decoding's rollback of rejected proposals). Those blocks hold no computed token, so none is registered."""
        keep = -(-num_tokens // self.block_size)
        assert keep >= seq.num_hashed_blocks, "truncating into blocks the prefix cache has seen"
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s reference to each of its blocks, last first; a block nobody references becomes
        evictable if registered, free otherwise."""
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table.clear()
        seq.num_hashed_blocks = 0

    # -- prefix cache ---------------------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The registered blocks that hold the longest cached prefix of a sequence not yet admitted (empty
        block table, nothing computed), leaving at least its last token to compute. Takes nothing. A request
        with prompt_log_probs reuses nothing: every prompt position must be computed to be scored."""
        if not self.enable_prefix_caching or seq.block_table or seq.num_computed_tokens or seq.params.prompt_log_probs:
            return []
        bs = self.block_size
        blocks: list[int] = []
        parent, digest = ROOT, self.root_hash
        for j in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids(j * bs, (j + 1) * bs))
            digest = block_hash(digest, tokens)
            block = self.cached.get(digest)
            if block is None or not self._holds(block, tokens, parent):
                break
            blocks.append(block)
            parent = block
        return blocks

    def reuse(self, seq: Sequence, prefix: list[int]) -> None:
        """Admit `seq` with `prefix` (from `cached_prefix`) as the start of its block table: those tokens
        count as computed. Counts the lookup in the prefix-cache statistics."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "reuse is for a sequence being admitted"
        for block in prefix:
            self._share(block)
        seq.block_table.extend(prefix)
        seq.num_hashed_blocks = len(prefix)
        seq.num_computed_tokens = len(prefix) * self.block_size
        if seq.num_cached_tokens is None:  # its first admission (not a resumption after preemption)
            seq.num_cached_tokens = seq.num_computed_tokens
        if self.enable_prefix_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that became full and computed since the last call.

        If an equal block (same tokens, same parent) is registered already (two sequences computed the
        same prefix at once), `seq` switches to that block and its own copy goes back to the pool. A block
        whose digest is taken by a different block (a collision) stays unregistered, and so do the blocks
        after it in `seq`."""
        if not self.enable_prefix_caching:
            return
        bs, table = self.block_size, seq.block_table
        num_full = min(seq.num_computed_tokens // bs, len(table))
        for j in range(seq.num_hashed_blocks, num_full):
            parent = table[j - 1] if j else ROOT
            parent_hash = self.hash_of[parent] if j else self.root_hash
            if parent_hash is None:  # the chain broke at a collision
                break
            tokens = tuple(seq.token_ids(j * bs, (j + 1) * bs))
            digest = block_hash(parent_hash, tokens)
            block, twin = table[j], self.cached.get(digest)
            assert self.hash_of[block] is None, f"block {block} is registered twice"
            if twin is None:
                self.hash_of[block], self.tokens_of[block], self.parent_of[block] = digest, tokens, parent
                self.cached[digest] = block
            elif self._holds(twin, tokens, parent):
                self._share(twin)
                table[j] = twin
                self._release(block)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def reset_stats(self) -> None:
        self.num_queried_tokens = self.num_hit_tokens = 0

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_queries": self.num_queried_tokens, "prefix_cache_hits": self.num_hit_tokens,
                "blocks_cached": len(self.evictable)}

    def _holds(self, block: int, tokens: tuple[int, ...], parent: int) -> bool:
        """Whether registered `block` holds `tokens` right after `parent` (what a matching digest claims)."""
        return self.tokens_of[block] == tokens and self.parent_of[block] == parent

    def _share(self, block: int) -> None:
        """One more reference to a registered block (an evictable one is taken back)."""
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            if self.hash_of[block] is None:
                self.free_ids.append(block)
            else:
                self.evictable[block] = None

    def _unregister(self, block: int) -> None:
        del self.cached[self.hash_of[block]]
        self.hash_of[block] = self.tokens_of[block] = self.parent_of[block] = None

    def check(self, live: list[Sequence] | None = None) -> None:
        """Assert exact accounting; with `live` (every sequence holding blocks), that the reference
        counts are exactly the number of block tables holding each block."""
        free, evictable = set(self.free_ids), set(self.evictable)
        assert len(free) == len(self.free_ids), "a block is in the free list twice"
        used = {b for b in range(self.num_blocks) if self.ref_counts[b] > 0}
        assert not (free & used) and not (evictable & used) and not (free & evictable), \
            f"blocks in two states: {sorted((free & used) | (evictable & used) | (free & evictable))[:5]}"
        assert len(free) + len(evictable) + len(used) == self.num_blocks, "blocks in no state"
        assert all(self.hash_of[b] is None for b in free), "a free block is still registered"
        assert all(self.hash_of[b] is not None for b in evictable), "an evictable block is unregistered"
        registered = {b for b in range(self.num_blocks) if self.hash_of[b] is not None}
        assert set(self.cached.values()) == registered and len(self.cached) == len(registered), \
            "the hash map and the registered blocks differ"
        for digest, block in self.cached.items():
            assert self.hash_of[block] == digest, f"block {block} is mapped under a digest it does not have"
            parent = self.parent_of[block]
            assert parent == ROOT or self.hash_of[parent] is not None, f"block {block}'s parent is unregistered"
        if live is not None:
            counts = [0] * self.num_blocks
            for seq in live:
                for block in seq.block_table:
                    counts[block] += 1
            assert counts == self.ref_counts, "reference counts differ from the live block tables"
