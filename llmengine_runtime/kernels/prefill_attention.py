"""Causal variable-length attention for packed prompt chunks that also attend to their cached prefix.

Layout: q `[num_tokens, num_heads, head_dim]`; k, v `[num_tokens, num_kv_heads, head_dim]` (the new
tokens, packed sequence after sequence as `cu_seqlens_q` int32 `[num_seqs + 1]` says); k_cache, v_cache
`[num_blocks, block_size, num_kv_heads, head_dim]`; block_tables int32 `[num_seqs, max_blocks]`;
seq_lens int32 `[num_seqs]`, the total length of each sequence after this step. Sequence i has
`q_len = cu_seqlens_q[i+1] - cu_seqlens_q[i]` new tokens at positions `seq_lens[i] - q_len ...` and
`ctx_len = seq_lens[i] - q_len` earlier tokens that are read from the cache (the new ones come from k, v).
A new token at position p sees every position <= p, or with a sliding `window` > 0 the positions
p - window + 1 .. p (Mistral's convention, as transformers masks it). num_heads is a multiple of num_kv_heads: query
head h reads KV head `h // (num_heads // num_kv_heads)` (GQA, MQA), never a repeated copy.
Scores: `scale * q.k + alibi_slopes[h] * (k_pos - q_pos)` when slopes are given (callers fold any
1/sqrt(d) of their ALiBi convention into the slopes). Returns `[num_tokens, num_heads, head_dim]`.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmengine_runtime.kernels.attention_tiles import load_kv_tile, online_softmax_step
from llmengine_runtime.kernels.deterministic import deterministic
from llmengine_runtime.kernels.dispatch import use_triton


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: `[length, num_kv_heads, head_dim]`."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float,
                  alibi_slopes: torch.Tensor | None, window: int = 0) -> torch.Tensor:
    """q `[q_len, H, d]` at positions q_start.. over k, v `[k_len, Hkv, d]` at positions 0..; causal, and with
    `window` > 0 each query sees only its last `window` positions."""
    q_len, num_heads, _ = q.shape
    k_len, num_kv_heads, _ = k.shape
    # 4-D `[1, heads, len, d]` inputs: on CPU only those reach SDPA's flash kernel (3-D and 5-D ones take the
    # math path, 4x slower for a 1k-token prompt and quadratic in memory).
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
    gqa = num_heads != num_kv_heads
    if window > 0 and q_start + q_len <= window:  # no query reaches past its window
        window = 0
    if q_start == 0 and alibi_slopes is None and window <= 0:  # a whole prompt: plain causal attention, no mask
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)
    if (alibi_slopes is None and window <= 0 and q.device.type == "cpu" and q.dtype != torch.float64
            and k_len == q_start + q_len):
        return chunk_after_prefix(q4, k4, v4, q_start, scale)
    q_pos = torch.arange(q_start, q_start + q_len, device=q.device)
    k_pos = torch.arange(k_len, device=q.device)
    rel = (k_pos[None, :] - q_pos[:, None]).to(q.dtype if q.is_floating_point() else torch.float32)
    mask = torch.zeros(q_len, k_len, dtype=q.dtype, device=q.device)
    mask.masked_fill_(rel > 0, float("-inf"))
    if window > 0:
        mask.masked_fill_(rel <= -window, float("-inf"))
    if alibi_slopes is not None:
        mask = (mask[None] + alibi_slopes.to(q.dtype)[:, None, None] * rel[None])[None]  # [1, H, q_len, k_len]
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def chunk_after_prefix(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, ctx_len: int,
                       scale: float) -> torch.Tensor:
    """A prompt chunk after `ctx_len` cached tokens, on CPU: `[1, heads, len, d]` inputs (fewer KV heads than query
    heads for GQA, which the kernel takes as they are), the last q_len keys being the chunk's own. Its queries see
    every cached key (no mask) and their own keys causally; SDPA's CPU flash kernel does each part without a mask
    (it skips the causal part's upper tiles) and returns each part's log-sum-exp, which merges them exactly. An
    explicit [q_len, k_len] mask instead had every tile computed and masked: an 8k-token prompt in 2k chunks spent
    41 s in attention that way against 25 s (2 threads), as much as one causal call over the whole prompt."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out_ctx, lse_ctx = flash(q4, k4[:, :, :ctx_len], v4[:, :, :ctx_len], 0.0, False, scale=scale)[:2]
    out_own, lse_own = flash(q4, k4[:, :, ctx_len:], v4[:, :, ctx_len:], 0.0, True, scale=scale)[:2]
    lse = torch.logaddexp(lse_ctx, lse_own)
    out = out_ctx.float() * (lse_ctx - lse).exp()[..., None] + out_own.float() * (lse_own - lse).exp()[..., None]
    return out.to(q4.dtype)[0].transpose(0, 1)


def reference_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the reference attends one-token queries in: fp32 for bf16/fp16 on CPU, whose bf16 SDPA kernel
    is ~4x slower than its fp32 one for a single query (benchmarks/RESULTS.md); q's dtype otherwise."""
    low = q.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if low and q.device.type == "cpu" else q.dtype


def single_token_attention_ref(q, k, v, k_cache, v_cache, block_tables, ctx_lens, scale, alibi_slopes=None,
                               window=0):
    """Sequences with one new token each, all at once: the cached prefix gathered from every block of the
    tables, the new token's own K/V appended as the last key. q `[S, H, d]`, k/v `[S, Hkv, d]`."""
    num_seqs, num_heads, head_dim = q.shape
    compute = reference_dtype(q)
    keys = torch.cat([k_cache[block_tables].flatten(1, 2), k[:, None].to(k_cache.dtype)], dim=1).to(compute)
    values = torch.cat([v_cache[block_tables].flatten(1, 2), v[:, None].to(v_cache.dtype)], dim=1).to(compute)
    width = keys.shape[1] - 1
    k_pos = torch.arange(width + 1, device=q.device)
    rel = torch.where(k_pos == width, 0, k_pos - ctx_lens[:, None])  # [S, width + 1]; the query sits at ctx_len
    seen = (k_pos < ctx_lens[:, None]) & (rel > -window if window > 0 else True)
    mask = (seen | (k_pos == width))[:, None, None, :]
    if alibi_slopes is not None:
        bias = alibi_slopes.to(compute)[None, :, None, None] * rel[:, None, None, :].to(compute)
        mask = bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q.unsqueeze(2).to(compute), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=num_heads != keys.shape[2])
    return out.view(num_seqs, num_heads, head_dim).to(q.dtype)


def prefill_attention_ref(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, scale,
                          alibi_slopes=None, window=0) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    lengths = seq_lens.tolist()
    # The decode tokens of a mixed step (one new token after a cached prefix) go together in one product.
    single = [i for i, total in enumerate(lengths)
              if bounds[i + 1] - bounds[i] == 1 and total > 1 and k_cache is not None]
    if len(single) > 1:
        rows = torch.tensor([bounds[i] for i in single], device=q.device)
        ctx = torch.tensor([lengths[i] - 1 for i in single], device=q.device)
        out[rows] = single_token_attention_ref(q[rows], k[rows], v[rows], k_cache, v_cache,
                                               block_tables[torch.tensor(single, device=q.device)], ctx, scale,
                                               alibi_slopes, window)
    done = set(single) if len(single) > 1 else set()
    for i, total in enumerate(lengths):
        if i in done:
            continue
        start, end = bounds[i], bounds[i + 1]
        ctx_len = total - (end - start)
        k_i, v_i = k[start:end], v[start:end]
        if ctx_len > 0:
            k_i = torch.cat([gather_context(k_cache, block_tables[i], ctx_len).to(k.dtype), k_i])
            v_i = torch.cat([gather_context(v_cache, block_tables[i], ctx_len).to(v.dtype), v_i])
        out[start:end] = attention_ref(q[start:end], k_i, v_i, ctx_len, scale, alibi_slopes, window)
    return out


@triton.jit
def prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
    k_cache_ptr, v_cache_ptr, block_tables_ptr, alibi_slopes_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head, stride_c_block, stride_c_slot, stride_c_head, stride_bt_seq,
    scale, num_queries_per_kv, head_dim, block_size, window,
    HAS_CACHE: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Causal varlen flash attention of BLOCK_M new query tokens of one head over the cached prefix
    and the new tokens of their sequence.

    Layout: q, out `[num_tokens, num_heads, head_dim]`, k, v `[num_tokens, num_kv_heads, head_dim]`
    packed by cu_seqlens_q; k_cache, v_cache `[num_blocks, block_size, num_kv_heads, head_dim]` (same
    strides); block_tables `[num_seqs, max_blocks]`; last dims contiguous. Grid:
    `(cdiv(max_seqlen_q, BLOCK_M), num_heads, num_seqs)`. Program (m, h, i) takes local query rows
    `m*BLOCK_M ...` of sequence i and head h (KV head `h // num_queries_per_kv`) and runs an fp32 online
    softmax over (1) the `ctx_len = seq_len - q_len` cached tokens, gathered BLOCK_N at a time through
    the block table, all visible, then (2) the sequence's new tokens from k, v up to its last row, with
    the causal mask. A row at position p also masks keys at positions <= p - window (sliding window; the
    wrapper passes NO_WINDOW, 2^30, for none), and both loops start at the first tile that any of the
    program's rows sees. Scores are kept
    in the log2 domain (`scale * log2(e)` folded in). Head-dim is
    padded to the power of two BLOCK_D with masks. Programs past the end of a sequence exit at once.
    """
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + seq) - q_len
    kv_head = head // num_queries_per_kv

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the new tokens
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    m_mask = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634  # log2(e): softmax through exp2
    if HAS_ALIBI:
        slope = tl.load(alibi_slopes_ptr + head).to(tl.float32) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    q_pos = ctx_len + offs_m
    # the first key position any row of this program sees (0 without a window)
    first_key = tl.maximum(ctx_len + m_block * BLOCK_M - window + 1, 0)
    if HAS_CACHE:
        # (1) the cached prefix: every key precedes every query, no causal mask.
        for start in range((first_key // BLOCK_N) * BLOCK_N, ctx_len, BLOCK_N):
            k_pos = start + offs_n
            n_mask = k_pos < ctx_len
            k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, k_pos, n_mask, kv_head, offs_d,
                                d_mask, stride_bt_seq, stride_c_block, stride_c_slot, stride_c_head, block_size,
                                q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if HAS_ALIBI:
                s += slope * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
            seen = n_mask[None, :] & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    # (2) the new tokens, causal; keys beyond this block's last query row are never needed.
    end = tl.minimum(q_len, (m_block + 1) * BLOCK_M)
    first_new = tl.maximum(first_key - ctx_len, 0)
    for start in range((first_new // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        k_idx = start + offs_n
        n_mask = k_idx < q_len
        k_rows = (q_start + k_idx).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + k_rows[:, None] * stride_k_tok + kv_head * stride_k_head + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_ptr + k_rows[:, None] * stride_v_tok + kv_head * stride_v_head + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_ALIBI:
            s += slope * (k_idx[None, :] - offs_m[:, None]).to(tl.float32)
        rel = k_idx[None, :] - offs_m[:, None]
        seen = (rel <= 0) & (rel > -window) & n_mask[None, :]
        s = tl.where(seen, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


NO_WINDOW = 1 << 30  # the kernels' `window` when there is none: every key is within it


def kernel_window(window: int) -> int:
    """The `window` argument of the Triton kernels: `window` keys, or NO_WINDOW for 0 (none)."""
    return int(window) if window > 0 else NO_WINDOW


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def prefill_launch_config(dtype: torch.dtype, head_dim: int) -> dict:
    """Tile sizes: 128x64 tiles with 8 warps for 16-bit inputs; smaller, unpipelined ones for fp32 so
    that shared memory stays under the 99 KiB of sm_86/sm_89 (tf32x3 needs extra operand copies)."""
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)


def prefill_attention_triton(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, scale,
                             alibi_slopes=None, max_seqlen_q=None, out=None, block_m=None,
                             block_n=None, window=0) -> torch.Tensor:
    """Triton path of `prefill_attention`. `out` (optional) receives the result; `block_m`, `block_n`
    override the tile sizes (tests use small tiles to keep the interpreter fast)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    num_seqs = seq_lens.shape[0]
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    has_cache = k_cache is not None
    if has_cache:
        assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "caches must share a layout"
        cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
        block_size = k_cache.shape[1]
    else:
        k_cache = v_cache = block_tables = q  # never read
        cache_strides, block_size = (0, 0, 0, 0), 1
    config = prefill_launch_config(q.dtype, head_dim)
    if block_m is not None:
        config["BLOCK_M"] = block_m
    if block_n is not None:
        config["BLOCK_N"] = block_n
    grid = (triton.cdiv(max_seqlen_q, config["BLOCK_M"]), num_heads, num_seqs)
    prefill_attention_kernel[grid](
        q, k, v, out, cu_seqlens_q, seq_lens, k_cache, v_cache, block_tables,
        alibi_slopes if alibi_slopes is not None else q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), *cache_strides,
        scale, num_heads // num_kv_heads, head_dim, block_size, kernel_window(window),
        HAS_CACHE=has_cache, HAS_ALIBI=alibi_slopes is not None,
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=triton.next_power_of_2(head_dim), **config,
    )
    return out


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
    window: int = 0,
) -> torch.Tensor:
    """Attention of packed new tokens over their cached prefix and themselves (see module docstring).

    `k_cache` may be None when no sequence has a cached prefix. `max_seqlen_q` is a hint for the grid. `window` > 0:
    sliding-window attention over the last `window` positions.
    """
    if use_triton(q) and deterministic():  # --deterministic: each token as a decode row (deterministic_attention)
        from llmengine_runtime.kernels.deterministic_attention import deterministic_prefill_attention
        return deterministic_prefill_attention(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens,
                                               scale, alibi_slopes, max_seqlen_q, window)
    if use_triton(q):
        return prefill_attention_triton(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens,
                                        scale, alibi_slopes, max_seqlen_q, window=window)
    return prefill_attention_ref(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, scale,
                                 alibi_slopes, window)
