"""GGUF Q4_0 / Q4_1 / Q8_0 tensors as QuantizedLinear layers, without going through float weights.

Each block of a row covers 32 consecutive k's and starts with fp16 scale(s) (`gguf.constants.GGML_QUANT_SIZES`):
- Q4_0 (18 bytes): d, 16 bytes of nibbles; `w = (q - 8) * d`         -> int4 g32, scale d, zero 0.
- Q4_1 (20 bytes): d, m, 16 bytes of nibbles; `w = q * d + m`       -> int4 g32, scale d, zero m + 8d.
- Q8_0 (34 bytes): d, 32 int8; `w = q * d`                          -> int8 with per-32 scales d.
Nibble byte j of a block holds q[j] (low) and q[16 + j] (high). The q's carry over unchanged, so the map is
exact; what the kernels then do with the scales is QuantizedLinear's business: CPU stores them in bf16
(relative error <= 2^-8 per scale, so `|w - w_gguf| <= 2^-8 * (|(q - 8) d| + |zero|)`), CUDA in fp16 (exact).

Q8_0 keeps its per-block scales rather than one scale per row: on CPU that runs as two int4 planes (exact up
to the bf16 scale; 1.4-1.5x the time of torch's per-channel int8 kernel on this CPU). Requantizing to one
scale per row would be faster but, on SmolLM2's embedding (its tied head), adds an rms error of 1.2% of the
rms weight, 1.7x Q8_0's own; a caller who prefers that can `QuantizedLinear.quantize(dequantized, mode="int8")`.

q and k weights are in llama.cpp's rotary row order; `rotary_heads` permutes the rows of q, scale and zero
back per head, exactly as models/gguf.py does to the float weights.

Every other type of models/gguf_types.py's table (Q5_0, Q5_1, the K types; and any mix of types in one fused
projection) is kept as the file's bytes instead: `gguf_raw_weights` reads a tensor's rows (whole rows permuted
back the same way, which keeps every byte) and `gguf_projection` makes the models/gguf_linear.py layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmengine_runtime.models.gguf import unpermute_rotary
from llmengine_runtime.models.gguf_linear import GGUFLinear, GGUFRowParts
from llmengine_runtime.models.gguf_types import raw_rows
from llmengine_runtime.models.quantized_linear import QuantizedLinear

BLOCK = 32
QUANTIZED_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


@dataclass
class GGUFIntWeights:
    """The integer form of one GGUF tensor `[N, K]`: int4 `w = (q - 8) * scale + zero` (q uint8 0..15) or
    int8 `w = q * scale` (q int8, zero None); scale, zero fp32 `[N, K/32]`."""
    mode: str
    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    group_size: int = BLOCK


def gguf_int_weights(tensor, rotary_heads: int | None = None) -> GGUFIntWeights:
    """Read a GGUFReader tensor of type Q4_0, Q4_1 or Q8_0 into its exact integer form; with `rotary_heads`,
    undo llama.cpp's per-head rotary row order (q: the attention heads, k: the KV heads)."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype not in QUANTIZED_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name!r} has type {qtype.name}; only Q4_0, Q4_1, Q8_0 map to "
                         "integer weights (dequantize the others)")
    n, k = (int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert block_size == BLOCK, (qtype.name, block_size)
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // BLOCK, type_size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == GGMLQuantizationType.Q8_0:
        q = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
        out = GGUFIntWeights("int8", q, d, None)
    else:
        start = 4 if qtype == GGMLQuantizationType.Q4_1 else 2
        nibbles = blocks[..., start:]
        q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(n, k)
        if qtype == GGMLQuantizationType.Q4_1:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            zero = m + 8 * d
        else:
            zero = np.zeros_like(d)
        out = GGUFIntWeights("int4", q, d, zero)
    if rotary_heads is not None:
        out.q, out.scale = unpermute_rotary(out.q, rotary_heads), unpermute_rotary(out.scale, rotary_heads)
        if out.zero is not None:
            out.zero = unpermute_rotary(out.zero, rotary_heads)
    return out


def rotary_heads_for(name: str, config: dict) -> int | None:
    """How many heads to un-permute for a llama GGUF tensor name (as models/gguf.py's to_hf_tensor)."""
    if ".attn_q." in name:
        return config["num_attention_heads"]
    if ".attn_k." in name:
        return config["num_key_value_heads"]
    return None


def concat_rows(parts: list[GGUFIntWeights]) -> GGUFIntWeights:
    """Stack tensors of one kind along N, for fused projections (q; k; v -> qkv_proj, gate; up -> gate_up_proj).
    Parts of different kinds (say Q4_1 q with a Q8_0 v) cannot share one layer: dequantize those instead."""
    first = parts[0]
    if any(p.mode != first.mode or p.group_size != first.group_size for p in parts):
        raise ValueError(f"cannot fuse {[p.mode for p in parts]} rows into one quantized layer")
    zero = None if first.zero is None else np.concatenate([p.zero for p in parts])
    return GGUFIntWeights(first.mode, np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]),
                          zero, first.group_size)


def quantized_linear(weights: GGUFIntWeights, bias: torch.Tensor | None = None,
                     device: str | torch.device = "cpu") -> QuantizedLinear:
    """The QuantizedLinear of an integer form, built on `device` (its kernels are chosen by the device)."""
    def to_torch(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    if weights.mode == "int8":
        return QuantizedLinear.from_int8(to_torch(weights.q), to_torch(weights.scale), weights.group_size, bias)
    return QuantizedLinear.from_int4(to_torch(weights.q), to_torch(weights.scale), to_torch(weights.zero),
                                     weights.group_size, bias)


def quantized_linear_from_gguf(tensor, config: dict | None = None, bias: torch.Tensor | None = None,
                               device: str | torch.device = "cpu") -> QuantizedLinear:
    """A QuantizedLinear holding one Q4_0/Q4_1/Q8_0 GGUF tensor. `config` (models/gguf.py's llama_config) is
    needed for attn_q / attn_k, whose rows get un-permuted."""
    heads = rotary_heads_for(tensor.name, config) if config is not None else None
    if heads is None and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
        raise ValueError(f"{tensor.name}: pass the model config to undo llama.cpp's rotary row order")
    return quantized_linear(gguf_int_weights(tensor, heads), bias, device)


@dataclass
class GGUFRawWeights:
    """One GGUF tensor `[N, K]` as its file bytes: uint8 `[N, row_bytes]` of type `qtype`, rows in HF order."""
    raw: torch.Tensor
    qtype: GGMLQuantizationType
    k: int


def gguf_raw_weights(tensor, rotary_heads: int | None = None) -> GGUFRawWeights:
    """A GGUFReader tensor of any type in models/gguf_types.py's table as its bytes (UnsupportedGGUFType, naming
    it, for the others); with `rotary_heads`, its rows permuted back from llama.cpp's rotary order."""
    raw = raw_rows(tensor)
    if rotary_heads is not None:
        raw = unpermute_rotary(raw, rotary_heads).contiguous()
    return GGUFRawWeights(raw, GGMLQuantizationType(tensor.tensor_type), int(tensor.shape[0]))


def gguf_projection(parts: list[GGUFRawWeights], bias: torch.Tensor | None = None,
                    device: str | torch.device = "cpu") -> GGUFLinear | GGUFRowParts:
    """The layer of one projection made of `parts` stacked along N (q; k; v or gate; up): one GGUFLinear when the
    parts share a type (their rows concatenated), else a GGUFRowParts of one GGUFLinear per run of equal types."""
    if len({p.k for p in parts}) != 1:
        raise ValueError(f"cannot stack rows of {[p.k for p in parts]} columns into one projection")
    runs: list[list[GGUFRawWeights]] = []
    for part in parts:
        if runs and runs[-1][0].qtype == part.qtype:
            runs[-1].append(part)
        else:
            runs.append([part])
    layers = [GGUFLinear(torch.cat([p.raw for p in run]).to(device), run[0].qtype, run[0].k) for run in runs]
    if len(layers) == 1:
        return GGUFLinear(layers[0].raw, layers[0].ggml_type, layers[0].in_features, bias)
    return GGUFRowParts(layers, bias)
