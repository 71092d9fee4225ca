"""Attention under `--deterministic` (kernels/deterministic.py): every query row, decode or prompt, over its
sequence's paged cache in fixed splits of keys, merged in order, so a row's output depends on its own query, keys
and position only: not on the batch, its row in it, or whether it came in a prompt, a prompt chunk or a decode step.

Layout: q `[rows, num_heads, head_dim]`; k_cache, v_cache `[num_blocks, block_size, num_kv_heads, head_dim]` (same
strides, last dim contiguous) already holding every key a row sees; block_tables int32 `[rows, max_blocks]`, one
table per row; seq_lens int32 `[rows]`: row r sits at position `seq_lens[r] - 1` and sees positions
`0 .. seq_lens[r] - 1` (with a sliding `window` > 0 the last `window` of them). Scores `scale * q.k +
alibi_slopes[h] * (k_pos - q_pos)`. Returns `[rows, num_heads, head_dim]`.

Two phases, as flash-decoding: split s of a row holds the absolute key positions `s * split_keys .. (s + 1) *
split_keys - 1`, read BLOCK_N at a time from an absolute multiple of BLOCK_N; then one program per (row, head) merges
the row's splits one after another, first to last. The split count the grid covers follows the block tables' width,
but a row's own splits, tiles and merge order follow its position alone. (The default decode path instead picks its
split count from the batch size, decode_attention.default_num_splits, and prompts take prefill_attention.py's
kernel, which reduces in another order.) Prompts become rows here one token each: a token's table is its
sequence's, and a cache-less prompt's K/V are read as a cache of one-token blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmengine_runtime.kernels.attention_tiles import load_kv_tile, online_softmax_step

SPLIT_KEYS = 256  # keys per split: fixed, so a row's partition of its keys follows its position only
NO_WINDOW = 1 << 30  # the kernels' window when there is none


@triton.jit
def fixed_split_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, alibi_slopes_ptr, mid_out_ptr, mid_lse_ptr,
    stride_q_row, stride_q_head, stride_c_block, stride_c_slot, stride_c_head, stride_bt_row,
    stride_mo_row, stride_mo_head, stride_mo_split, stride_ml_row, stride_ml_head,
    scale, num_queries_per_kv, head_dim, block_size, window, split_keys,
    HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Phase 1: the query heads of one KV head of one row over one fixed split of its keys.

    Layout: as the module docstring; mid_out fp32 `[rows, num_heads, num_splits, head_dim]`, mid_lse fp32
    `[rows, num_heads, num_splits]`. Grid: `(rows, num_kv_heads, num_splits)`. Program (r, g, s) stacks the
    `num_queries_per_kv` query heads of KV head g as the rows of one `[BLOCK_G >= 16, BLOCK_D]` tile, runs an fp32
    online softmax over the keys of split s that row r sees (positions `max(s * split_keys, seq_len - window) ..
    min((s + 1) * split_keys, seq_len) - 1`, BLOCK_N at a time through the row's block table), and writes the
    split's normalised output and log2-sum-exp (-inf when the row sees none of its keys).
    """
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    start = tl.maximum(split * split_keys, seq_len - window)
    end = tl.minimum((split + 1) * split_keys, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < num_queries_per_kv
    d_mask = offs_d < head_dim
    heads = kv_head * num_queries_per_kv + offs_g
    q = tl.load(q_ptr + row.to(tl.int64) * stride_q_row + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634  # log2(e): softmax through exp2
    if HAS_ALIBI:
        slopes = tl.load(alibi_slopes_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for k_start in range((start // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        k_pos = k_start + offs_n
        n_mask = (k_pos >= start) & (k_pos < end)
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, row, k_pos, n_mask, kv_head, offs_d,
                            d_mask, stride_bt_row, stride_c_block, stride_c_slot, stride_c_head, block_size, q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_ALIBI:
            s += slopes[:, None] * (k_pos - (seq_len - 1)).to(tl.float32)[None, :]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    at = row.to(tl.int64) * stride_mo_row + heads * stride_mo_head + split * stride_mo_split
    tl.store(mid_out_ptr + at[:, None] + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(mid_lse_ptr + row.to(tl.int64) * stride_ml_row + heads * stride_ml_head + split, lse, mask=g_mask)


@triton.jit
def merge_splits_in_order_kernel(
    mid_out_ptr, mid_lse_ptr, seq_lens_ptr, out_ptr,
    stride_mo_row, stride_mo_head, stride_mo_split, stride_ml_row, stride_ml_head, stride_o_row, stride_o_head,
    head_dim, window, split_keys,
    BLOCK_D: tl.constexpr,
):
    """Phase 2: one (row, query head)'s splits merged first to last.

    Layout: as fixed_split_attention_kernel's mid_out / mid_lse; out `[rows, num_heads, head_dim]`. Grid:
    `(rows, num_heads)`. Over the row's own splits (those holding a key it sees), one loop finds the largest
    log2-sum-exp, a second adds `2^(lse_s - max) * out_s` and `2^(lse_s - max)` in split order; the output is their
    quotient (zeros for a row with no keys).
    """
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + row)
    first = tl.maximum(seq_len - window, 0) // split_keys
    last = tl.cdiv(seq_len, split_keys)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    lse_row = mid_lse_ptr + row * stride_ml_row + head * stride_ml_head
    out_row = mid_out_ptr + row * stride_mo_row + head * stride_mo_head
    lse_max = tl.full([], float("-inf"), dtype=tl.float32)
    for s in range(first, last):
        lse_max = tl.maximum(lse_max, tl.load(lse_row + s))
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(first, last):
        weight = tl.exp2(tl.load(lse_row + s) - lse_max)
        total += weight
        acc += weight * tl.load(out_row + s * stride_mo_split + offs_d, mask=d_mask, other=0.0)
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * stride_o_row + head * stride_o_head + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def fixed_split_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float, alibi_slopes: torch.Tensor | None = None,
                          window: int = 0, split_keys: int = SPLIT_KEYS, block_n: int | None = None) -> torch.Tensor:
    """Rows of q over their caches (module docstring). `split_keys` (a multiple of `block_n`, the keys per tile)
    and `block_n` are fixed for a dtype; tests pass small ones."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "caches must share a layout"
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    block_n = block_n or (32 if q.dtype == torch.float32 else 64)
    assert split_keys % block_n == 0, f"split_keys {split_keys} must be a multiple of block_n {block_n}"
    num_splits = triton.cdiv(block_tables.shape[1] * k_cache.shape[1], split_keys)  # covers every row's keys
    window = int(window) if window > 0 else NO_WINDOW
    block_d = triton.next_power_of_2(head_dim)
    mid_out = torch.empty(rows, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(rows, num_heads, num_splits, dtype=torch.float32, device=q.device)
    fixed_split_attention_kernel[(rows, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, alibi_slopes if alibi_slopes is not None else q,
        mid_out, mid_lse, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), mid_out.stride(0), mid_out.stride(1), mid_out.stride(2), mid_lse.stride(0),
        mid_lse.stride(1), scale, group, head_dim, k_cache.shape[1], window, split_keys,
        HAS_ALIBI=alibi_slopes is not None, DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
        num_stages=2)
    merge_splits_in_order_kernel[(rows, num_heads)](
        mid_out, mid_lse, seq_lens, out, mid_out.stride(0), mid_out.stride(1), mid_out.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1), head_dim, window, split_keys,
        BLOCK_D=block_d)
    return out


def prompt_rows(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor | None,
                num_tokens: int, max_seqlen_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed prompt token as a row: (its block table `[T, max_blocks]`, its seq_len = position + 1). Without
    a cache (block_tables None) token t is block t of a one-token-block cache over k, v."""
    device = cu_seqlens_q.device
    starts = cu_seqlens_q[:-1].long()
    q_lens = cu_seqlens_q[1:].long() - starts
    seq_of_token = torch.repeat_interleave(torch.arange(len(q_lens), device=device), q_lens, output_size=num_tokens)
    local = torch.arange(num_tokens, device=device) - starts[seq_of_token]
    if block_tables is None:  # seq_lens == q_lens: no cached prefix
        width = torch.arange(max(max_seqlen_q, 1), device=device)
        block_tables = (starts[:, None] + width[None, :]).clamp(max=max(num_tokens - 1, 0)).to(torch.int32)
    ctx = seq_lens.long() - q_lens
    return block_tables[seq_of_token], (ctx[seq_of_token] + local + 1).to(torch.int32)


def deterministic_prefill_attention(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, scale,
                                    alibi_slopes=None, max_seqlen_q=None, window=0, split_keys=SPLIT_KEYS,
                                    block_n=None) -> torch.Tensor:
    """prefill_attention's inputs (kernels/prefill_attention.py; with a cache, the new tokens' K/V already stored
    in it, as models/attention.paged_attention does) through fixed_split_attention, one row per token."""
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if q.shape[0] else 0
    if k_cache is None:
        k_cache, v_cache = k.contiguous().unsqueeze(1), v.contiguous().unsqueeze(1)
        block_tables = None
    tables, row_lens = prompt_rows(cu_seqlens_q, seq_lens, block_tables, q.shape[0], max_seqlen_q)
    return fixed_split_attention(q, k_cache, v_cache, tables, row_lens, scale, alibi_slopes, window, split_keys,
                                 block_n)
