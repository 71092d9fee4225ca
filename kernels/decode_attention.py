"""Attention of one new query token per sequence over that sequence's paged KV cache.

Layout: q `[num_seqs, num_heads, head_dim]`; k_cache, v_cache `[num_blocks, block_size, num_kv_heads,
head_dim]` already holding the new token; block_tables int32 `[num_seqs, max_blocks]`; seq_lens int32
`[num_seqs]`. The query of sequence i sits at position `seq_lens[i] - 1` and sees positions
`0 .. seq_lens[i] - 1`. Query head h reads KV head `h // (num_heads // num_kv_heads)`. Scores:
`scale * q.k + alibi_slopes[h] * (k_pos - q_pos)` when slopes are given. Returns
`[num_seqs, num_heads, head_dim]`.
"""

import torch

from kernels.dispatch import use_triton


def decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, alibi_slopes=None):
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = int(seq_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    tables = block_tables[:, :num_blocks].long()
    # [num_seqs, num_kv_heads, max_len, head_dim]
    keys = k_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).to(q.dtype)
    values = v_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).to(q.dtype)
    queries = q.view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale
    k_pos = torch.arange(max_len, device=q.device)
    if alibi_slopes is not None:
        rel = (k_pos[None, :] - (seq_lens.long()[:, None] - 1)).float()
        scores += alibi_slopes.float().view(1, num_kv_heads, group, 1) * rel[:, None, None, :]
    scores.masked_fill_(k_pos[None, None, None, :] >= seq_lens.long()[:, None, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, values).view(num_seqs, num_heads, head_dim)


def decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, alibi_slopes=None):
    raise NotImplementedError("Triton decode_attention: see the kernels issue")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over its paged cache (see module docstring)."""
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, alibi_slopes)
    return decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, alibi_slopes)
