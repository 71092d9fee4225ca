"""The CPU int4/int8 weights' two layouts: rows in order (kernels/cpu/quant_gemm.cpp) and eight rows interleaved
(kernels/cpu/q4_interleaved.cpp, q8_interleaved.cpp), the layout QuantizedLinear keeps when N is a multiple of 8.

Rows in order: q4 qs uint8 `[N, nb * 16]` (block b of row n at bytes 16b..16b+15), q8 qs int8 `[N, nb * 32]`;
d (and q4's m) fp16 `[N, nb]`.
Interleaved, group g of rows 8g..8g+7 and block b: q4 qs `[N / 8, nb, 128]` with `[g, b, 32c + 4j + i] =
qs[8g + j, 16b + 4c + i]` (c < 4); q8 qs `[N / 8, nb, 256]` with `[g, b, 32c + 4j + i] = qs[8g + j, 32b + 4c + i]`
(c < 8); d and m `[N / 8, nb, 8]` with `[g, b, j] = d[8g + j, b]`. The bytes are the same, only moved: the
deinterleave functions give them back.
"""

from __future__ import annotations

import torch

GROUP = 8
Tensors = tuple[torch.Tensor, ...]


def _check(qs: torch.Tensor, d: torch.Tensor, bytes_per_block: int) -> tuple[int, int]:
    n, nb = d.shape
    if n % GROUP or tuple(qs.shape) != (n, nb * bytes_per_block):
        raise ValueError(f"interleaving takes qs [N, nb * {bytes_per_block}] and scales [N, nb] with N a multiple "
                         f"of 8; got {tuple(qs.shape)} and {tuple(d.shape)}")
    return n, nb


def _per_block(t: torch.Tensor) -> torch.Tensor:  # [N, nb] -> [N / 8, nb, 8]
    n, nb = t.shape
    return t.reshape(n // GROUP, GROUP, nb).permute(0, 2, 1).contiguous()


def _in_order(t: torch.Tensor) -> torch.Tensor:  # [N / 8, nb, 8] -> [N, nb]
    groups, nb, _ = t.shape
    return t.permute(0, 2, 1).reshape(groups * GROUP, nb).contiguous()


def _chunks(qs: torch.Tensor, n: int, nb: int, chunks: int) -> torch.Tensor:
    q = qs.reshape(n // GROUP, GROUP, nb, chunks, 4).permute(0, 2, 3, 1, 4)
    return q.reshape(n // GROUP, nb, chunks * 32).contiguous()


def _unchunk(qs: torch.Tensor, chunks: int) -> torch.Tensor:
    groups, nb = qs.shape[:2]
    q = qs.reshape(groups, nb, chunks, GROUP, 4).permute(0, 3, 1, 2, 4)
    return q.reshape(groups * GROUP, nb * chunks * 4).contiguous()


def interleave8(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Tensors:
    """q4 rows in order -> interleaved (qs, d, m)."""
    n, nb = _check(qs, d, 16)
    if tuple(m.shape) != (n, nb):
        raise ValueError(f"m must be [N, nb] = {(n, nb)}, not {tuple(m.shape)}")
    return _chunks(qs, n, nb, 4), _per_block(d), _per_block(m)


def deinterleave8(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Tensors:
    """q4 interleaved -> rows in order (qs, d, m)."""
    return _unchunk(qs, 4), _in_order(d), _in_order(m)


def interleave8_q8(qs: torch.Tensor, d: torch.Tensor) -> Tensors:
    """q8 rows in order -> interleaved (qs, d)."""
    n, nb = _check(qs, d, 32)
    return _chunks(qs, n, nb, 8), _per_block(d)


def deinterleave8_q8(qs: torch.Tensor, d: torch.Tensor) -> Tensors:
    """q8 interleaved -> rows in order (qs, d)."""
    return _unchunk(qs, 8), _in_order(d)
