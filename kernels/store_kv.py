"""Write the K/V of new tokens into the paged cache.

Layout: k, v `[num_tokens, num_kv_heads, head_dim]`; k_cache, v_cache
`[num_blocks, block_size, num_kv_heads, head_dim]`; slot_mapping int64 `[num_tokens]` holding
`block_id * block_size + offset`, or -1 for a token that is not stored.
"""

import torch

from kernels.dispatch import use_triton


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    raise NotImplementedError("Triton store_kv: see the kernels issue")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter `k`, `v` into `k_cache`, `v_cache` at `slot_mapping` (in place)."""
    if use_triton(k):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
