"""Rotary position embedding, rotate-half (NeoX) layout as HF checkpoints use.

Layout: q `[num_tokens, num_heads, head_dim]`, k `[num_tokens, num_kv_heads, head_dim]`, positions int64
`[num_tokens]`, cos_sin_cache `[max_positions, head_dim]` holding `cos` in the first half and `sin` in
the second (each `[rotary_dim / 2]` frequencies; rotary_dim == head_dim). For each pair (x1, x2) =
(x[i], x[i + d/2]): `(x1 cos - x2 sin, x2 cos + x1 sin)`. Returns new q and k (inputs untouched).
"""

import torch

from kernels.dispatch import use_triton


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_triton(q, k, positions, cos_sin_cache):
    raise NotImplementedError("Triton rotary: see the kernels issue")


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotate q and k by the angles of `positions` (see module docstring)."""
    if use_triton(q):
        return rotary_triton(q, k, positions, cos_sin_cache)
    return rotary_ref(q, k, positions, cos_sin_cache)
