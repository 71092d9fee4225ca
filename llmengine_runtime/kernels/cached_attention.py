"""Attention of packed query rows whose keys and values are all in the paged cache, their own included.

Layout: q `[num_tokens, num_heads, head_dim]`, the new tokens of each sequence packed as `cu_seqlens_q` int32
`[num_seqs + 1]` says; k_cache, v_cache `[num_blocks, block_size, num_kv_heads, head_dim]`, already holding the new
tokens (store_kv ran first, as models/attention.py's paged_attention does); block_tables int32 `[num_seqs,
max_blocks]`; seq_lens int32 `[num_seqs]` after the step. Row i of a sequence with q_len new tokens sits at position
`seq_lens - q_len + i` and sees every cached position up to its own (with a sliding `window` > 0, the last `window`
of them). Scores: `scale * q.k + alibi_slopes[h] * (k_pos - q_pos)`. Returns `[num_tokens, num_heads, head_dim]`.

On the CPU (fp32 rows, fp32 or fp16 caches) our C++ kernel computes each row exactly as a decode step computes its
one row (kernels/cpu/attention.cpp: fixed chunks of keys merged in a fixed order), so a token's attention does not
depend on whether it came in a prompt chunk, a decode step or a speculative verification, on the other rows, or on
the thread count. Elsewhere the plain-torch reference below.
"""

import torch

from llmengine_runtime.kernels.cpu import cpu_kv_caches, use_cpu_kernel
from llmengine_runtime.kernels.prefill_attention import attention_ref, gather_context


def cached_attention_ref(q, k_cache, v_cache, cu_seqlens_q, block_tables, seq_lens, scale, alibi_slopes=None,
                         window=0):
    out = torch.empty_like(q)
    bounds, lengths = cu_seqlens_q.tolist(), seq_lens.tolist()
    for i, total in enumerate(lengths):
        start, end = bounds[i], bounds[i + 1]
        k_i = gather_context(k_cache, block_tables[i], total).to(q.dtype)
        v_i = gather_context(v_cache, block_tables[i], total).to(q.dtype)
        out[start:end] = attention_ref(q[start:end], k_i, v_i, total - (end - start), scale, alibi_slopes, window)
    return out


def cached_attention_applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the C++ kernel takes these: fp32 rows on the CPU with our kernels loaded, CPU caches it reads."""
    return use_cpu_kernel(q) and cpu_kv_caches(k_cache, v_cache)


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     alibi_slopes: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """Every row over its sequence's cache (see module docstring)."""
    if cached_attention_applies(q, k_cache, v_cache):
        return torch.ops.llmengine_cpu.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
                                                       scale, alibi_slopes, window)
    return cached_attention_ref(q, k_cache, v_cache, cu_seqlens_q, block_tables, seq_lens, scale, alibi_slopes,
                                window)
