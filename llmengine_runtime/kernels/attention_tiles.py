"""Triton pieces the attention kernels share (prefill_attention.py, decode_attention.py, deterministic_attention.py):
reading a tile of cached K/V rows through a block table, and folding a tile of scores into an online softmax."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, k_pos, n_mask, kv_head, offs_d, d_mask,
                 stride_bt_seq, stride_c_block, stride_c_slot, stride_c_head, block_size, dtype):
    """K and V `[N, D]` of the cached positions k_pos of one sequence and KV head, through its block table
    (masked rows and columns read 0), cast to `dtype`."""
    block = tl.load(block_tables_ptr + seq * stride_bt_seq + k_pos // block_size, mask=n_mask, other=0)
    slot = block.to(tl.int64) * stride_c_block + (k_pos % block_size) * stride_c_slot + kv_head * stride_c_head
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(dtype)
    v = tl.load(v_cache_ptr + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(dtype)
    return k, v


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one tile of log2-domain scores s `[M, N]` (masked entries -inf) and values v `[N, D]` into
    the running max m_i, denominator l_i and unnormalised output acc (all fp32). A row with no key seen yet
    (a sliding window's rows before their window) keeps m_i = -inf, l_i = 0 and acc = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp2(-inf - -inf) would be NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
