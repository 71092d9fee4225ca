"""bf16 projections through oneDNN's packed weights on CPU: the same products, ~1.6x faster.

oneDNN's reordered ("packed") bf16 weight runs the matrix-vector products of decoding ~1.6x faster than
`F.linear` on this CPU (benchmarks/RESULTS.md), with identical results. A packed weight is an opaque tensor
that torch.compile cannot trace as a module attribute, so the packed weights live in a table here and the
model's Linear layers name theirs by index through one custom op: compiled graphs see an int, not the tensor.
"""

from __future__ import annotations

import torch
from torch import nn

PACKED: list[torch.Tensor] = []


@torch.library.custom_op("llmengine::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    """`x @ W.T` for the weight packed at PACKED[index]."""
    return torch.ops.mkldnn._linear_pointwise(x, PACKED[index], None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def can_pack(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack(weight: torch.Tensor) -> int:
    """Pack a `[out, in]` bf16 weight; returns its index."""
    PACKED.append(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
    return len(PACKED) - 1


def pack_linear(module: nn.Linear) -> None:
    """Move a Linear's weight into the packed table; its parameter keeps the shape on the meta device."""
    module.packed_index = pack(module.weight.data)
    module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
