"""Causal variable-length attention for packed prompt chunks that also attend to their cached prefix.

Layout: q `[num_tokens, num_heads, head_dim]`; k, v `[num_tokens, num_kv_heads, head_dim]` (the new
tokens, packed sequence after sequence as `cu_seqlens_q` int32 `[num_seqs + 1]` says); k_cache, v_cache
`[num_blocks, block_size, num_kv_heads, head_dim]`; block_tables int32 `[num_seqs, max_blocks]`;
seq_lens int32 `[num_seqs]`, the total length of each sequence after this step. Sequence i has
`q_len = cu_seqlens_q[i+1] - cu_seqlens_q[i]` new tokens at positions `seq_lens[i] - q_len ...` and
`ctx_len = seq_lens[i] - q_len` earlier tokens that are read from the cache (the new ones come from k, v).
A new token at position p sees every position <= p. num_heads is a multiple of num_kv_heads: query
head h reads KV head `h // (num_heads // num_kv_heads)` (GQA, MQA), never a repeated copy.
Scores: `scale * q.k + alibi_slopes[h] * (k_pos - q_pos)` when slopes are given (callers fold any
1/sqrt(d) of their ALiBi convention into the slopes). Returns `[num_tokens, num_heads, head_dim]`.
"""

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: `[length, num_kv_heads, head_dim]`."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float,
                  alibi_slopes: torch.Tensor | None) -> torch.Tensor:
    """q `[q_len, H, d]` at positions q_start.. over k, v `[k_len, Hkv, d]` at positions 0..; causal."""
    q_len, num_heads, _ = q.shape
    k_len, num_kv_heads, _ = k.shape
    q_pos = torch.arange(q_start, q_start + q_len, device=q.device)
    k_pos = torch.arange(k_len, device=q.device)
    rel = (k_pos[None, :] - q_pos[:, None]).to(q.dtype if q.is_floating_point() else torch.float32)
    mask = torch.zeros(q_len, k_len, dtype=q.dtype, device=q.device)
    mask.masked_fill_(rel > 0, float("-inf"))
    if alibi_slopes is not None:
        mask = mask[None] + alibi_slopes.to(q.dtype)[:, None, None] * rel[None]
    group = num_heads // num_kv_heads
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unflatten(0, (num_kv_heads, group)),
        k.transpose(0, 1)[:, None],
        v.transpose(0, 1)[:, None],
        attn_mask=mask if alibi_slopes is None else mask.unflatten(0, (num_kv_heads, group)),
        scale=scale,
    )
    return out.flatten(0, 1).transpose(0, 1)


def prefill_attention_ref(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, scale,
                          alibi_slopes=None) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    lengths = seq_lens.tolist()
    for i, total in enumerate(lengths):
        start, end = bounds[i], bounds[i + 1]
        ctx_len = total - (end - start)
        k_i, v_i = k[start:end], v[start:end]
        if ctx_len > 0:
            k_i = torch.cat([gather_context(k_cache, block_tables[i], ctx_len).to(k.dtype), k_i])
            v_i = torch.cat([gather_context(v_cache, block_tables[i], ctx_len).to(v.dtype), v_i])
        out[start:end] = attention_ref(q[start:end], k_i, v_i, ctx_len, scale, alibi_slopes)
    return out


def prefill_attention_triton(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, scale,
                             alibi_slopes=None, max_seqlen_q=None) -> torch.Tensor:
    raise NotImplementedError("Triton prefill_attention: see the kernels issue")


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    seq_lens: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
) -> torch.Tensor:
    """Attention of packed new tokens over their cached prefix and themselves (see module docstring).

    `k_cache` may be None when no sequence has a cached prefix. `max_seqlen_q` is a hint for the grid.
    """
    if use_triton(q):
        return prefill_attention_triton(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens,
                                        scale, alibi_slopes, max_seqlen_q)
    return prefill_attention_ref(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, scale,
                                 alibi_slopes)
