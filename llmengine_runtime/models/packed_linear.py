"""Projections through oneDNN's packed ("reordered") weights on CPU: the same products, 1.4-4x faster.

On this CPU, oneDNN's matrix product with a weight reordered into its blocked layout beats MKL's `F.linear`
with either weight layout, for fp32 and bf16 and at every row count that matters: 1.4x for one row (decode),
3-4x for 2-8 rows (small batches), 2.6x for 17 rows (a short prompt); benchmarks/RESULTS.md has the table.
The results are the products' to the rounding of a different summation order.

A packed weight is an opaque tensor that torch.compile cannot trace as a module attribute, so packed weights
live in a table here and layers name theirs by index through one custom op: compiled graphs see an int, not
the tensor. Each entry is tied to the module that owns it and leaves the table when that module is freed.
"""

from __future__ import annotations

import functools
import itertools
import weakref

import torch
from torch import nn

PACKED: dict[int, torch.Tensor] = {}
_indices = itertools.count()
# oneDNN picks the blocked layout for a row count; one layout serves every count. Packing for 16 rows is as
# fast as packing for 1 at one row and 1.5x faster from 4 rows on (benchmarks/RESULTS.md).
PACK_FOR_ROWS = 16


@torch.library.custom_op("llmengine::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    """`x @ W.T` for the weight packed at PACKED[index]."""
    return packed_product(x, PACKED[index])


@packed_linear.register_fake
def _(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@functools.cache
def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` weights on this CPU: fp32 wherever oneDNN is built in; bf16 only with
    the instructions its bf16 path needs (AVX-512 BW/VL/DQ or AVX-NE-CONVERT), so it is tried once."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available() \
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        packed_product(torch.ones(1, 16, dtype=dtype), reorder(torch.ones(16, 16, dtype=dtype)))
    except RuntimeError:  # "bf16 path needs the cpu support ..."
        return False
    return True


def reorder(weight: torch.Tensor, rows: int = PACK_FOR_ROWS) -> torch.Tensor:
    """A `[out, in]` CPU weight in oneDNN's blocked layout for products with `rows` rows (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


def packed_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """`x @ W.T` for a weight that `reorder` packed."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def pack(weight: torch.Tensor, owner: object) -> int:
    """Pack a `[out, in]` CPU weight for as long as `owner` lives; returns its index."""
    index = next(_indices)
    PACKED[index] = reorder(weight)
    weakref.finalize(owner, PACKED.pop, index, None)
    return index


def pack_linear(module: nn.Linear) -> None:
    """Move a Linear's weight into the packed table; its parameter keeps the shape on the meta device."""
    module.packed_index = pack(module.weight.data, module)
    module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
