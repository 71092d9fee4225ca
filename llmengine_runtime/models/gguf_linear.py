"""Projections and embedding tables kept as a GGUF file's own bytes, of any type in models/gguf_types.py.

- `GGUFLinear(raw, ggml_type, in_features, bias=None)`: `y = x W^T (+ bias)`, W `[N, K]` held as uint8 `[N,
  row_bytes]` exactly as the file stores its rows (K / block blocks per row; rows may be permuted as whole rows,
  e.g. q/k back from llama.cpp's rotary order, which keeps every byte). Where it runs:
  - CPU with our C++ product for the type (`torch.ops.llmengine_cpu.gguf_linear(x fp32 [M, K], raw, type, K,
    bias) -> fp32 [M, N]`, kernels/cpu/gguf_*.cpp, asked through `gguf_types.has_cpu_product`): the file's
    integers times x quantized per block (Q8_0 or Q8_K, the table's `activation`). `backend == "cpu"`. Each row
    of the result is the same whatever the other rows of x are (the op guarantees it).
  - otherwise (no such op, the type not taken, under torch.compile, CUDA): the weight is dequantized once (exact,
    the table's dequantizer) to x's dtype, kept, and multiplied by `F.linear` (kernels/deterministic_matmul.py's
    `linear`: F.linear unless --deterministic puts it on the fixed-tile Triton product). `backend ==
    "dequantized"`: not a quantized kernel, and it holds the dense weight beside the bytes. F.linear (oneDNN,
    cuBLAS) may block its sums differently for different numbers of rows, so a row's result can depend on the
    batch in the last bits.
- `GGUFRowParts(parts, bias)`: a fused projection (q|k|v, gate|up) whose parts have different types: each part a
  GGUFLinear, the outputs concatenated (then the bias added).
- `GGUFEmbedding(raw, ggml_type, embedding_dim, dtype)`: the table as the file's bytes; a lookup dequantizes only
  the rows it looks up. A tied head is a GGUFLinear over the same `raw` tensor (no copy).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import nn

from llmengine_runtime.kernels.deterministic_matmul import linear
from llmengine_runtime.models.gguf_types import gguf_type, has_cpu_product


def _checked_raw(raw: torch.Tensor, ggml_type: int | GGMLQuantizationType, k: int):
    entry = gguf_type(ggml_type)
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != entry.row_bytes(k):
        raise ValueError(f"{entry.name} weights of {k} columns are uint8 [N, {entry.row_bytes(k)}], "
                         f"not {raw.dtype} {tuple(raw.shape)}")
    return entry


class GGUFLinear(nn.Module):
    """`y = x W^T (+ bias)`, W one GGUF tensor's raw rows (module docstring). x `[..., K]` in any float dtype."""

    def __init__(self, raw: torch.Tensor, ggml_type: int | GGMLQuantizationType, in_features: int,
                 bias: torch.Tensor | None = None):
        """raw: uint8 `[N, row_bytes]` (kept as given, on its device: build the layer where it will run);
        ggml_type: a type of models/gguf_types.py's table; in_features: K; bias: `[N]` or None."""
        super().__init__()
        self.entry = _checked_raw(raw, ggml_type, in_features)
        self.ggml_type = self.entry.qtype
        self.in_features, self.out_features = in_features, raw.shape[0]
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias {tuple(bias.shape)} does not fit {self.out_features} rows")
        self.register_buffer("raw", raw, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.dense: torch.Tensor | None = None  # the dequantized weight, made at the first call that needs it
        self.chosen: tuple[torch.device, str] | None = None  # (the bytes' device, the backend chosen there)

    @property
    def backend(self) -> str:
        """"cpu" where the C++ product runs it, else "dequantized" (F.linear over the dequantized weight); chosen
        where the bytes first run (again if they move), as QuantizedLinear chooses when it is built."""
        device = self.raw.device
        if self.chosen is None or self.chosen[0] != device:
            self.chosen = (device, "cpu" if device.type == "cpu" and has_cpu_product(self.ggml_type)
                           else "dequantized")
        return self.chosen[1]

    def dequantize(self) -> torch.Tensor:
        """W as fp32 `[N, K]` (a fresh tensor), exactly gguf-py's dequantization of the bytes."""
        return self.entry.dequantize(self.raw, self.in_features)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W in `dtype` on the bytes' device, dequantized at the first call and kept."""
        w = self.dense
        if w is None or w.dtype != dtype or w.device != self.raw.device:
            w = self.dense = self.dequantize().to(dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "cpu" and not torch.compiler.is_compiling():
            bias = None if self.bias is None else self.bias.float()
            y = torch.ops.llmengine_cpu.gguf_linear(x2.float().contiguous(), self.raw, int(self.ggml_type),
                                                     self.in_features, bias).to(x.dtype)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = linear(x2, self.dense_weight(x.dtype), bias)  # F.linear, or --deterministic's product
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.entry.name}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, backend={self.backend}"


class GGUFRowParts(nn.Module):
    """A fused projection of parts with different GGUF types: `y = [x W_0^T | x W_1^T | ...] (+ bias)`."""

    def __init__(self, parts: list[GGUFLinear], bias: torch.Tensor | None = None):
        super().__init__()
        if len({p.in_features for p in parts}) != 1 or any(p.bias is not None for p in parts):
            raise ValueError("fused GGUF parts share K and carry no bias of their own (pass it here)")
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias {tuple(bias.shape)} does not fit {self.out_features} rows")
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class GGUFEmbedding(nn.Module):
    """An embedding table kept as the file's bytes: `forward(ids)` dequantizes the rows of `ids` (to `dtype`)."""

    def __init__(self, raw: torch.Tensor, ggml_type: int | GGMLQuantizationType, embedding_dim: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.entry = _checked_raw(raw, ggml_type, embedding_dim)
        self.ggml_type, self.dtype = self.entry.qtype, dtype
        self.num_embeddings, self.embedding_dim = raw.shape[0], embedding_dim
        self.register_buffer("raw", raw, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """An empty `[0, embedding_dim]` tensor in the model's dtype and device: what callers that ask the table
        for those (the model runner, the KV-cache plan) read. The rows themselves are in `raw`."""
        return torch.empty(0, self.embedding_dim, dtype=self.dtype, device=self.raw.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.entry.dequantize(self.raw[ids.reshape(-1)], self.embedding_dim)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def tied_head(self) -> GGUFLinear:
        """The output head that shares this table's bytes."""
        return GGUFLinear(self.raw, self.ggml_type, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.entry.name}, {self.num_embeddings}, {self.embedding_dim}"
