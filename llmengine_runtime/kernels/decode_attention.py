"""Attention of one new query token per sequence over that sequence's paged KV cache.

Layout: q `[num_seqs, num_heads, head_dim]`; k_cache, v_cache `[num_blocks, block_size, num_kv_heads,
head_dim]` already holding the new token; block_tables int32 `[num_seqs, max_blocks]`; seq_lens int32
`[num_seqs]`. The query of sequence i sits at position `seq_lens[i] - 1` and sees positions
`0 .. seq_lens[i] - 1`, or with a sliding `window` > 0 the last `window` of them. Query head h reads
KV head `h // (num_heads // num_kv_heads)`. Scores: `scale * q.k + alibi_slopes[h] * (k_pos - q_pos)` when
slopes are given. Returns `[num_seqs, num_heads, head_dim]`.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmengine_runtime.kernels.attention_tiles import load_kv_tile, online_softmax_step
from llmengine_runtime.kernels.cpu import cpu_kv_caches, use_cpu_kernel
from llmengine_runtime.kernels.deterministic import deterministic
from llmengine_runtime.kernels.dispatch import use_triton
from llmengine_runtime.kernels.prefill_attention import kernel_window, reference_dtype


def decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, alibi_slopes=None, window=0):
    num_seqs, num_heads, head_dim = q.shape
    compute = reference_dtype(q)
    # Every block the tables name (the runner sizes them to the longest sequence), gathered in one go;
    # positions past a sequence's length are masked.
    keys = k_cache[block_tables].flatten(1, 2).transpose(1, 2).to(compute)  # [num_seqs, num_kv_heads, width, d]
    values = v_cache[block_tables].flatten(1, 2).transpose(1, 2).to(compute)
    k_pos = torch.arange(keys.shape[2], device=q.device)
    rel = k_pos - (seq_lens[:, None].long() - 1)  # [num_seqs, width]: key position - query position
    mask = ((rel <= 0) & (rel > -window if window > 0 else True))[:, None, None, :]
    if alibi_slopes is not None:
        bias = alibi_slopes.to(compute)[None, :, None, None] * rel[:, None, None, :].to(compute)
        mask = bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q.unsqueeze(2).to(compute), keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=num_heads != keys.shape[1])
    return out.view(num_seqs, num_heads, head_dim).to(q.dtype)


@triton.jit
def decode_attention_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, alibi_slopes_ptr,
    mid_out_ptr, mid_lse_ptr,
    stride_q_seq, stride_q_head, stride_c_block, stride_c_slot, stride_c_head, stride_bt_seq,
    stride_mo_seq, stride_mo_head, stride_mo_split, stride_ml_seq, stride_ml_head,
    scale, num_queries_per_kv, head_dim, block_size, num_splits, window,
    HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Flash-decoding, phase 1: the query heads of one KV head over one split of one sequence's cache.

    Layout: q `[num_seqs, num_heads, head_dim]`; k_cache, v_cache `[num_blocks, block_size,
    num_kv_heads, head_dim]` (same strides); block_tables `[num_seqs, max_blocks]`; last dims
    contiguous. mid_out fp32 `[num_seqs, num_heads, num_splits, head_dim]`, mid_lse fp32
    `[num_seqs, num_heads, num_splits]`. Grid: `(num_seqs, num_kv_heads, num_splits)`.
    Program (i, g, s) stacks the `num_queries_per_kv` query heads of KV head g as the rows of one
    `[BLOCK_G >= 16, BLOCK_D]` tile (padded rows masked, so tl.dot gets >= 16 rows and each K/V tile is
    loaded once for the whole group), runs an fp32 online softmax over split s of the keys
    sequence i's query sees (positions `max(seq_len - window, 0) .. seq_len - 1`; the wrapper passes window
    2^30 for none; split length `cdiv(keys, num_splits)` rounded up to BLOCK_N, keys gathered through the
    block table),
    and writes the split's normalised output and its log2-sum-exp (-inf for an empty split).
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_key = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - first_key, num_splits), BLOCK_N) * BLOCK_N
    start = first_key + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < num_queries_per_kv
    d_mask = offs_d < head_dim
    heads = kv_head * num_queries_per_kv + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634  # log2(e): softmax through exp2
    if HAS_ALIBI:
        slopes = tl.load(alibi_slopes_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for k_start in range(start, end, BLOCK_N):
        k_pos = k_start + offs_n
        n_mask = k_pos < end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, k_pos, n_mask, kv_head, offs_d, d_mask,
                            stride_bt_seq, stride_c_block, stride_c_slot, stride_c_head, block_size, q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_ALIBI:
            s += slopes[:, None] * (k_pos - (seq_len - 1)).to(tl.float32)[None, :]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    row = seq.to(tl.int64) * stride_mo_seq + heads * stride_mo_head + split * stride_mo_split
    tl.store(mid_out_ptr + row[:, None] + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    lse_row = seq.to(tl.int64) * stride_ml_seq + heads * stride_ml_head + split
    tl.store(mid_lse_ptr + lse_row, lse, mask=g_mask)


@triton.jit
def decode_attention_reduce_kernel(
    mid_out_ptr, mid_lse_ptr, out_ptr,
    stride_mo_seq, stride_mo_head, stride_mo_split, stride_ml_seq, stride_ml_head,
    stride_o_seq, stride_o_head,
    head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Flash-decoding, phase 2: merge the per-split outputs of one (sequence, query head).

    Layout: as decode_attention_split_kernel's mid_out / mid_lse; out `[num_seqs, num_heads, head_dim]`.
    Grid: `(num_seqs, num_heads)`. One program loads the `num_splits` (padded to BLOCK_S) partial
    outputs and log2-sum-exps and writes `sum_s 2^(lse_s - max) * out_s / sum_s 2^(lse_s - max)`;
    empty splits (lse -inf) weigh 0, and a sequence with no keys at all gets zeros.
    """
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(mid_lse_ptr + seq * stride_ml_seq + head * stride_ml_head + offs_s, mask=s_mask,
                  other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    parts = tl.load(mid_out_ptr + seq * stride_mo_seq + head * stride_mo_head
                    + offs_s[:, None] * stride_mo_split + offs_d[None, :],
                    mask=s_mask[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < head_dim)


def default_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough splits for about two programs per SM, at most 16 (without reading seq_lens on the host)."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, triton.cdiv(2 * sms, num_seqs * num_kv_heads)))


def decode_launch_config(dtype: torch.dtype, num_queries_per_kv: int) -> dict:
    """Tile sizes of the split kernel: the head group padded to >= 16 rows (tl.dot's minimum)."""
    return dict(BLOCK_G=max(16, triton.next_power_of_2(num_queries_per_kv)),
                BLOCK_N=32 if dtype == torch.float32 else 64, num_warps=4, num_stages=2)


def decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, alibi_slopes=None,
                            out=None, num_splits=None, block_n=None, window=0):
    """Triton path of `decode_attention`. `out` (optional) receives the result; `num_splits` and
    `block_n` (keys per tile) override the defaults; `window` > 0: sliding-window attention."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "caches must share a layout"
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, q.device)
    config = decode_launch_config(q.dtype, group)
    if block_n is not None:
        config["BLOCK_N"] = block_n
    block_d = triton.next_power_of_2(head_dim)
    mid_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    decode_attention_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, alibi_slopes if alibi_slopes is not None else q,
        mid_out, mid_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        mid_out.stride(0), mid_out.stride(1), mid_out.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        scale, group, head_dim, k_cache.shape[1], num_splits, kernel_window(window),
        HAS_ALIBI=alibi_slopes is not None,
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=block_d, **config,
    )
    decode_attention_reduce_kernel[(num_seqs, num_heads)](
        mid_out, mid_lse, out,
        mid_out.stride(0), mid_out.stride(1), mid_out.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), head_dim, num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
    )
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """One query token per sequence over its paged cache (see module docstring)."""
    if use_triton(q) and deterministic():  # --deterministic: fixed key splits, as prompt rows take them
        from llmengine_runtime.kernels.deterministic_attention import fixed_split_attention
        return fixed_split_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, alibi_slopes, window)
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, alibi_slopes,
                                       window=window)
    if use_cpu_kernel(q) and cpu_kv_caches(k_cache, v_cache):
        return torch.ops.llmengine_cpu.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                        alibi_slopes, window)
    return decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, alibi_slopes, window)
