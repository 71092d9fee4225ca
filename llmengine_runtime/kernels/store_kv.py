"""Write the K/V of new tokens into the paged cache.

Layout: k, v `[num_tokens, num_kv_heads, head_dim]`; k_cache, v_cache
`[num_blocks, block_size, num_kv_heads, head_dim]`; slot_mapping int64 `[num_tokens]` holding
`block_id * block_size + offset`, or -1 for a token that is not stored.
"""

import torch
import triton
import triton.language as tl

from llmengine_runtime.kernels.cpu import cpu_kv_caches, use_cpu_kernel
from llmengine_runtime.kernels.dispatch import use_triton


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    if not torch.compiler.is_compiling() and bool((slot_mapping < 0).any()):  # compiled decode never skips
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@triton.jit
def store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head,
    num_kv_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Scatter one token's K and V into the paged cache.

    Layout: k, v `[num_tokens, num_kv_heads, head_dim]` (last dim contiguous); k_cache, v_cache
    `[num_blocks, block_size, num_kv_heads, head_dim]` with the same strides, last dim contiguous.
    Grid: `(num_tokens, cdiv(num_kv_heads, BLOCK_H))`. One program copies a `[BLOCK_H, BLOCK_D]` tile
    (heads x padded head_dim) of token `program_id(0)` to slot `slot_mapping[token]`, or does nothing
    when that slot is -1.
    """
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_dim)
    src_k = k_ptr + token.to(tl.int64) * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :]
    src_v = v_ptr + token.to(tl.int64) * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :]
    dst = block * stride_c_block + offset * stride_c_slot + heads[:, None] * stride_c_head + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "caches must share a layout"
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    store_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, head_dim, k_cache.shape[1],
        BLOCK_H=block_h, BLOCK_D=block_d,
    )


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter `k`, `v` into `k_cache`, `v_cache` at `slot_mapping` (in place)."""
    if use_triton(k):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    elif use_cpu_kernel(k, v) and cpu_kv_caches(k_cache, v_cache):
        torch.ops.llmengine_cpu.store_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
