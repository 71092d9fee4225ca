"""The per-step batch description shared by the runner and the models, and paged attention over it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmengine_runtime.kernels import decode_attention, prefill_attention, store_kv
from llmengine_runtime.kernels.cached_attention import cached_attention, cached_attention_applies
from llmengine_runtime.models.model_config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, kv_heads, d]


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device | str) -> list[KVCache]:
    """One zeroed (k_cache, v_cache) pair per layer, `[num_blocks, block_size, num_kv_heads, head_dim]` each."""
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_layers)]


@dataclass
class AttentionMetadata:
    """One forward step: sequences with `q_len` new tokens each, packed one after another.

    cu_seqlens_q int32 `[num_seqs + 1]`; seq_lens int32 `[num_seqs]` (tokens in the cache after the step);
    slot_mapping int64 `[num_tokens]` (cache slot of each new token, -1 = not stored); block_tables int32
    `[num_seqs, max_blocks]` or None when the step runs without a KV cache.
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_seqlen_q: int = 0
    is_decode: bool = False  # every sequence has exactly one new token and there is a cache

    @staticmethod
    def for_prompts(lengths: list[int], device: torch.device | str = "cpu") -> AttentionMetadata:
        """A cache-less prefill of whole prompts (used by tests and for scoring)."""
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        return AttentionMetadata(cu.to(device), torch.tensor(lengths, dtype=torch.int32, device=device),
                                 max_seqlen_q=max(lengths))

    def seq_len_per_token(self) -> torch.Tensor:
        """Each new token's sequence length after this step (for dynamic RoPE)."""
        q_lens = self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]
        return torch.repeat_interleave(self.seq_lens, q_lens.long())


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
                    meta: AttentionMetadata, scale: float, alibi_slopes: torch.Tensor | None = None,
                    window: int = 0) -> torch.Tensor:
    """Store the new K/V in the cache, then attend: q `[T, H, d]`, k/v `[T, Hkv, d]` -> `[T, H, d]`. `window` > 0:
    a query at position p sees keys p - window + 1 .. p only (sliding-window attention); 0: every key up to p."""
    if kv_cache is None:
        return prefill_attention(q, k, v, meta.cu_seqlens_q, None, None, None, meta.seq_lens, scale,
                                 alibi_slopes, meta.max_seqlen_q, window=window)
    k_cache, v_cache = kv_cache
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    if meta.is_decode:
        return decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, alibi_slopes,
                                window=window)
    if cached_attention_applies(q, k_cache, v_cache):  # each row as a decode step would attend it (batch-invariant)
        return cached_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.block_tables, meta.seq_lens, scale,
                                alibi_slopes, window=window)
    return prefill_attention(q, k, v, meta.cu_seqlens_q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                             scale, alibi_slopes, meta.max_seqlen_q, window=window)
