"""The q4 weight's two CPU layouts: rows in order (kernels/cpu/quant_gemm.cpp) and eight rows interleaved
(kernels/cpu/q4_interleaved.cpp, the layout QuantizedLinear keeps when N is a multiple of 8).

Rows in order: qs uint8 `[N, nb * 16]` (block b of row n at bytes 16b..16b+15), d and m fp16 `[N, nb]`.
Interleaved: qs `[N / 8, nb, 128]` with `[g, b, 32c + 4j + i] = qs[8g + j, 16b + 4c + i]`, d and m `[N / 8, nb, 8]`
with `[g, b, j] = d[8g + j, b]`. The bytes are the same, only moved: `deinterleave8(*interleave8(...))` gives them
back.
"""

from __future__ import annotations

import torch

GROUP = 8


Q4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # qs, d, m


def interleave8(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Q4:
    """Rows in order -> interleaved; N must be a multiple of 8."""
    n, nb = d.shape
    if n % GROUP or tuple(qs.shape) != (n, nb * 16) or tuple(m.shape) != (n, nb):
        raise ValueError(f"interleave8 takes qs [N, nb * 16], d and m [N, nb] with N a multiple of 8; got "
                         f"{tuple(qs.shape)}, {tuple(d.shape)}, {tuple(m.shape)}")
    q = qs.reshape(n // GROUP, GROUP, nb, 4, 4).permute(0, 2, 3, 1, 4).reshape(n // GROUP, nb, 128)
    per_block = lambda t: t.reshape(n // GROUP, GROUP, nb).permute(0, 2, 1)  # noqa: E731
    return q.contiguous(), per_block(d).contiguous(), per_block(m).contiguous()


def deinterleave8(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Q4:
    """Interleaved -> rows in order."""
    groups, nb = qs.shape[:2]
    q = qs.reshape(groups, nb, 4, GROUP, 4).permute(0, 3, 1, 2, 4).reshape(groups * GROUP, nb * 16)
    in_order = lambda t: t.permute(0, 2, 1).reshape(groups * GROUP, nb)  # noqa: E731
    return q.contiguous(), in_order(d).contiguous(), in_order(m).contiguous()
