"""Rotary position embedding, rotate-half (NeoX) layout as HF checkpoints use.

Layout: q `[num_tokens, num_heads, head_dim]`, k `[num_tokens, num_kv_heads, head_dim]`, positions int64
`[num_tokens]`, cos_sin_cache `[max_positions, head_dim]` holding `cos` in the first half and `sin` in
the second (each `[rotary_dim / 2]` frequencies; rotary_dim == head_dim). For each pair (x1, x2) =
(x[i], x[i + d/2]): `(x1 cos - x2 sin, x2 cos + x1 sin)`. Returns new q and k (inputs untouched).
"""

import torch
import triton
import triton.language as tl

from llmengine_runtime.kernels.cpu import use_cpu_kernel
from llmengine_runtime.kernels.dispatch import use_triton


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    # in q's dtype, as HF computes it: (x * cos) + (rotate_half(x) * sin)
    cos, sin = cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, stride_src_head, stride_dst_head, heads, num_heads, cos, sin,
                  half, BLOCK_HALF: tl.constexpr):
    """Rotate the `[len(heads), head_dim]` tile at src (one token) into dst; pairs (i, i + half)."""
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < half)
    src = src_ptr + heads[:, None] * stride_src_head + dims[None, :]
    dst = dst_ptr + heads[:, None] * stride_dst_head + dims[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@triton.jit
def rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
    stride_qo_tok, stride_qo_head, stride_ko_tok, stride_ko_head, stride_cs,
    num_heads, num_kv_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate-half rotary embedding of one token's q and k heads.

    Layout: q `[num_tokens, num_heads, head_dim]`, k `[num_tokens, num_kv_heads, head_dim]` and the
    outputs alike (last dim contiguous); positions int64 `[num_tokens]`; cos_sin `[max_pos, head_dim]`
    = [cos | sin], `half = head_dim // 2` frequencies each. Grid: `(num_tokens, cdiv(max(num_heads,
    num_kv_heads), BLOCK_H))`. One program rotates heads `program_id(1) * BLOCK_H ...` of q and of k
    for token `program_id(0)`, in fp32, writing the new q and k in their dtype.
    """
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + dims, mask=dims < half, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + dims, mask=dims < half, other=0.0).to(tl.float32)
    cos = cos[None, :]
    sin = sin[None, :]
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _rotate_heads(q_ptr + token * stride_q_tok, q_out_ptr + token * stride_qo_tok, stride_q_head,
                  stride_qo_head, heads, num_heads, cos, sin, half, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_k_tok, k_out_ptr + token * stride_ko_tok, stride_k_head,
                  stride_ko_head, heads, num_kv_heads, cos, sin, half, BLOCK_HALF)


def rotary_triton(q, k, positions, cos_sin_cache):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_heads, num_kv_heads)), max(1, 2048 // block_half))
    grid = (num_tokens, triton.cdiv(max(num_heads, num_kv_heads), block_h))
    rotary_kernel[grid](
        q, k, q_out, k_out, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        num_heads, num_kv_heads, half,
        BLOCK_H=block_h, BLOCK_HALF=block_half,
    )
    return q_out, k_out


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotate q and k by the angles of `positions` (see module docstring)."""
    if use_triton(q):
        return rotary_triton(q, k, positions, cos_sin_cache)
    if use_cpu_kernel(q, k, cos_sin_cache):
        return torch.ops.llmengine_cpu.rotary(q, k, positions, cos_sin_cache)
    return rotary_ref(q, k, positions, cos_sin_cache)
