"""Which GGUF type each tensor gets in a llama-quantize file type ("mixture"), as llama.cpp decides it.

    types = mixture_types("q4_k_m", {"token_embd.weight": (49152, 576), ...}, n_layer=30, n_head=9, n_head_kv=3)

The rules of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the file types offered here, without an
importance matrix or overrides, for dense (not mixture-of-experts) models:
- only matrices whose name ends in "weight" and is not a norm are quantized; the rest keep their type;
- each file type has a default type (q4_k_m: Q4_K, q5_k_m: Q5_K, q4_0: Q4_0, ...);
- output.weight, and token_embd.weight when the model has no output.weight (tied), get Q6_K (Q8_0 under q8_0,
  and Q8_0 for Falcon or when the row length is not a multiple of the default type's block);
- attn_v (attn_qkv, attn_kv_b): q4_k_m / q5_k_m give Q6_K to the `use_more_bits` ones (the first and last eighth
  of them, and every third in between); q4_k_s Q5_K to the first 4; q3_k_m Q5_K to the first 2, Q4_K the rest;
  q3_k_l Q5_K; q2_k Q4_K with 4+ query heads per KV head, else Q3_K; a 70B Llama (80 layers, GQA) lifts Q3_K
  and Q4_K to Q5_K;
- ffn_down of layer i (the i-th ffn_down met): q4_k_m / q5_k_m Q6_K where use_more_bits(i); q4_k_s Q5_K in the
  first eighth; q3_k_m Q5_K in the first 16th, then Q4_K (Falcon: Q3_K unless use_more_bits); q3_k_l Q5_K
  (Falcon Q4_K); q2_k Q3_K; (q4_k_m on Falcon: Q6_K, Q5_K, Q4_K by layer);
- attn_output: q2_k Q3_K, q3_k_m Q4_K, q3_k_l Q5_K (Falcon: q3_k_l Q4_K); fused attn_qkv: q3_k_m/l Q4_K,
  q4_k_m Q5_K, q5_k_m Q6_K (only reached when not counted as attn_v above, i.e. never: kept for the record);
- last, a type whose block does not divide the row length falls back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
  Q2_K/Q3_K -> Q4_0; a 32-block type that does not fit either -> F16.
Tensors are visited in llama.cpp's order (by layer number, then by name, the non-layer tensors first), which is
what the attn_v and ffn_down counters count.
"""

from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
DEFAULT_TYPES = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0,
                 "q2_k": T.Q2_K, "q3_k_s": T.Q3_K, "q3_k_m": T.Q3_K, "q3_k_l": T.Q3_K, "q4_k_s": T.Q4_K,
                 "q4_k_m": T.Q4_K, "q5_k_s": T.Q5_K, "q5_k_m": T.Q5_K, "q6_k": T.Q6_K}
MIXTURES = tuple(DEFAULT_TYPES)
FALLBACKS = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0}
LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def category(name: str) -> str:
    """llama.cpp's broad tensor category (`tensor_get_category`)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                      ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                      ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                      ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama-quantize quantizes this tensor at all (`tensor_allows_quantization`, llama's part): a matrix
    to ggml (some dimension other than the row length above 1: a single row counts as a vector)."""
    return any(d > 1 for d in shape[:-1]) and name.endswith("weight") and "_norm.weight" not in name \
        and "ffn_gate_inp.weight" not in name


def llama_order(names: list[str]) -> list[str]:
    """The order llama.cpp's loader keeps tensors in: by layer number (non-layer tensors first), then by name."""
    def key(name: str) -> tuple[int, str]:
        match = LAYER.match(name)
        return (int(match.group(1)) if match else -1, name)
    return sorted(names, key=key)


def _mixture_type(ftype: str, default: GGMLQuantizationType, cat: str, row_length: int, counters: dict[str, int],
                  totals: dict[str, int], tied: bool, falcon: bool, n_gqa: int, is_70b: bool) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl for one tensor (updates the attn_v / ffn_down counters)."""
    new = default
    if cat == "output" or (tied and cat == "token_embd"):
        if falcon or row_length % GGML_QUANT_SIZES[default][0]:
            return T.Q8_0
        return default if default == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        return new
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        i, n = counters["attn_v"], totals["attn_v"]
        if ftype == "q2_k":
            new = T.Q4_K if n_gqa >= 4 else T.Q3_K
        elif ftype == "q3_k_m":
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ftype == "q3_k_l":
            new = T.Q5_K
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            new = T.Q6_K
        elif ftype == "q4_k_s" and i < 4:
            new = T.Q5_K
        if is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        counters["attn_v"] += 1
    elif cat == "ffn_down":
        i, n = counters["ffn_down"], totals["ffn_down"]
        if ftype == "q2_k":
            new = T.Q3_K
        elif ftype == "q3_k_m":
            new = T.Q5_K if i < n // 16 else T.Q4_K if not falcon or use_more_bits(i, n) else T.Q3_K
        elif ftype == "q3_k_l":
            new = T.Q4_K if falcon else T.Q5_K
        elif ftype == "q4_k_m":
            if falcon:
                new = T.Q6_K if i < n // 16 else T.Q5_K if use_more_bits(i, n) else T.Q4_K
            elif use_more_bits(i, n):
                new = T.Q6_K
        elif ftype == "q5_k_m" and use_more_bits(i, n):
            new = T.Q6_K
        elif ftype == "q4_k_s" and not falcon and i < n // 8:
            new = T.Q5_K
        counters["ffn_down"] += 1
    elif cat == "attn_output":
        if not falcon:
            new = {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}.get(ftype, new)
        elif ftype == "q3_k_l":
            new = T.Q4_K
    return new


def fallback(qtype: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """llama.cpp's `tensor_type_fallback`: a type whose block fits rows of `row_length`."""
    if row_length % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = FALLBACKS.get(qtype, qtype)
    return qtype if row_length % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def mixture_types(ftype: str, tensors: dict[str, tuple[int, ...]], n_layer: int, n_head: int = 1,
                  n_head_kv: int = 1, arch: str = "llama", source_type: GGMLQuantizationType = T.F32
                  ) -> dict[str, GGMLQuantizationType]:
    """{GGUF tensor name: its type} under llama-quantize's file type `ftype` (one of MIXTURES, case-insensitive,
    "Q4_K_M" too). `tensors`: GGUF name -> numpy-order shape (`[rows, row_length]`); those not quantized keep
    `source_type`. `n_head`/`n_head_kv` give q2_k's GQA rule; `arch` "falcon" its own rules."""
    ftype = ftype.lower()
    if ftype not in DEFAULT_TYPES:
        raise ValueError(f"unknown llama-quantize type {ftype!r}; expected one of {', '.join(MIXTURES)}")
    default = DEFAULT_TYPES[ftype]
    totals = {"attn_v": sum(category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in tensors),
              "ffn_down": n_layer}
    counters = {"attn_v": 0, "ffn_down": 0}
    tied = "output.weight" not in tensors
    is_70b = arch == "llama" and n_layer == 80 and n_head != n_head_kv
    types = {}
    for name in llama_order(list(tensors)):
        shape = tensors[name]
        if not quantizable(name, shape):
            types[name] = source_type
            continue
        new = _mixture_type(ftype, default, category(name), shape[-1], counters, totals, tied, arch == "falcon",
                            n_head // max(1, n_head_kv), is_70b)
        types[name] = fallback(new, shape[-1])
    return types
