"""models/gguf_quantize*.py on fresh random weights: the simple types equal gguf-py's numpy reference quantizers,
every type round-trips (dequantized by gguf-py, independently of us) within its error bound on ragged shapes, and
the mixture table's rules. The byte-exact comparison with llama.cpp is test_gguf_quantize_golden.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from llmengine_runtime.models.gguf_quantize import QUANTIZABLE_TYPES, quantize_rows, row_bytes
from llmengine_runtime.models.gguf_quantize_mix import fallback, mixture_types, use_more_bits

T = GGMLQuantizationType
SIMPLE = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
# |w - dequant| <= bound * max|w| over the block of 32: half a step of the block's scale, the clamp at the top
# code of Q4_0 / Q5_0 (a whole step), plus the fp16 rounding of d (and m).
BLOCK_BOUND = {T.Q8_0: 0.5 / 127 + 2.0 ** -11, T.Q4_0: 1 / 8 * (1 + 2.0 ** -10), T.Q4_1: 1 / 15 + 2.0 ** -9,
               T.Q5_0: 1 / 16 * (1 + 2.0 ** -10), T.Q5_1: 1 / 31 + 2.0 ** -9}
# k-quants: relative rms error on Gaussian weights (measured: 0.30, 0.15, 0.072, 0.036, 0.018), and at most
# this fraction of the block's max|w| anywhere (measured 0.42, 0.23, 0.11, 0.071, 0.018).
K_BOUND = {T.Q2_K: (0.32, 0.5), T.Q3_K: (0.165, 0.3), T.Q4_K: (0.078, 0.14), T.Q5_K: (0.04, 0.09),
           T.Q6_K: (0.02, 0.025)}


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows of different scales, with a zero block, a negative constant block and an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[0, :32] = 0.0
    if rows > 1:
        w[1, :32] = -0.25
    w[-1, -1] *= 30.0
    return w


def dequantize(raw: torch.Tensor, qtype: T) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(raw.numpy(), qtype))


@pytest.mark.parametrize("qtype", SIMPLE, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (7, 256)])
def test_simple_types_equal_gguf_py(qtype, shape):
    w = weights(*shape, seed=shape[0])
    assert np.array_equal(quantize_rows(w, qtype).numpy(), quants.quantize(w.numpy(), qtype))


@pytest.mark.parametrize("qtype", QUANTIZABLE_TYPES, ids=lambda t: t.name)
def test_round_trip_within_bounds(qtype):
    block = GGML_QUANT_SIZES[qtype][0]
    for rows, blocks in [(1, 1), (3, 2), (5, 3)]:  # ragged: rows and blocks per row not powers of two
        w = weights(rows, block * blocks, seed=blocks)
        raw = quantize_rows(w, qtype)
        assert raw.dtype == torch.uint8 and tuple(raw.shape) == (rows, row_bytes(qtype, w.shape[1]))
        err = (dequantize(raw, qtype) - w).abs().view(rows, -1, 32)
        peak = w.abs().view(rows, -1, 32).amax(-1, keepdim=True)
        assert (err[0, 0] == 0).all()  # an all-zero block comes back exactly
        if qtype in BLOCK_BOUND:
            assert (err <= BLOCK_BOUND[qtype] * peak).all()
        else:
            rms_bound, max_bound = K_BOUND[qtype]
            assert (err <= max_bound * peak).all()
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 768, generator=g)
    rel = ((dequantize(quantize_rows(w, qtype), qtype) - w).norm() / w.norm()).item()
    assert rel <= (K_BOUND[qtype][0] if qtype in K_BOUND else 1.0)


def test_k_quant_searches_beat_their_block_peers():
    """The scale searches pay: each k-quant is more accurate than the 32-block type of as many bits, and more
    bits are more accurate (on the same Gaussian weights)."""
    w = torch.randn(32, 1024, generator=torch.Generator().manual_seed(3))

    def rel(qtype: T) -> float:
        return ((dequantize(quantize_rows(w, qtype), qtype) - w).norm() / w.norm()).item()

    errors = {t: rel(t) for t in QUANTIZABLE_TYPES}
    assert errors[T.Q4_K] < errors[T.Q4_1] < errors[T.Q4_0]
    assert errors[T.Q5_K] < errors[T.Q5_1] < errors[T.Q5_0]
    assert errors[T.Q2_K] > errors[T.Q3_K] > errors[T.Q4_K] > errors[T.Q5_K] > errors[T.Q6_K] > errors[T.Q8_0]


def test_edge_inputs():
    zeros = quantize_rows(torch.zeros(2, 256), T.Q6_K)
    assert (zeros == 0).all()  # llama.cpp writes an all-zero block as zero bytes
    assert (dequantize(quantize_rows(torch.zeros(2, 256), T.Q4_K), T.Q4_K) == 0).all()
    tiny = torch.full((1, 256), 1e-30)  # below the searches' 1e-15 "all zero" threshold: no division blows up
    assert torch.isfinite(dequantize(quantize_rows(tiny, T.Q3_K), T.Q3_K)).all()
    assert tuple(quantize_rows(torch.randn(3, 64, dtype=torch.bfloat16), T.Q8_0).shape) == (3, 68)
    f16 = quantize_rows(torch.randn(2, 40), "f16")
    assert tuple(f16.shape) == (2, 80)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_rows(torch.randn(2, 96), T.Q4_K)
    with pytest.raises(ValueError, match="no quantizer"):
        quantize_rows(torch.randn(2, 256), T.IQ4_XS)


def test_use_more_bits_and_fallbacks():
    # SmolLM2's 30 layers: the first and last 3, then every third from layer 3 + 2.
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert fallback(T.Q4_K, 576) == T.Q5_0 and fallback(T.Q5_K, 576) == T.Q5_1 and fallback(T.Q6_K, 576) == T.Q8_0
    assert fallback(T.Q3_K, 96) == T.Q4_0 and fallback(T.Q4_K, 512) == T.Q4_K and fallback(T.Q8_0, 40) == T.F16


def smollm2_shapes(tied: bool = True) -> dict[str, tuple[int, int]]:
    shapes = {"token_embd.weight": (49152, 576)} | ({} if tied else {"output.weight": (49152, 576)})
    for i in range(30):
        shapes |= {f"blk.{i}.attn_q.weight": (576, 576), f"blk.{i}.attn_k.weight": (192, 576),
                   f"blk.{i}.attn_v.weight": (192, 576), f"blk.{i}.attn_output.weight": (576, 576),
                   f"blk.{i}.ffn_gate.weight": (1536, 576), f"blk.{i}.ffn_up.weight": (1536, 576),
                   f"blk.{i}.ffn_down.weight": (576, 1536), f"blk.{i}.attn_norm.weight": (576,)}
    return shapes


def test_mixture_of_the_default_model():
    """SmolLM2-135M under q4_k_m: rows of 576 are not 256-multiples, so Q4_K falls back to Q5_0 and Q6_K to Q8_0
    everywhere but ffn_down (1536), whose use_more_bits layers get Q6_K; the tied table takes the output's Q8_0."""
    types = mixture_types("q4_k_m", smollm2_shapes(), n_layer=30, n_head=9, n_head_kv=3)
    assert types["token_embd.weight"] == T.Q8_0 and types["blk.0.attn_norm.weight"] == T.F32
    assert {types[f"blk.{i}.{p}.weight"] for i in range(30) for p in ("attn_q", "attn_k", "attn_output",
                                                                        "ffn_gate", "ffn_up")} == {T.Q5_0}
    assert [types[f"blk.{i}.attn_v.weight"] == T.Q8_0 for i in range(30)] == [use_more_bits(i, 30) for i in range(30)]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(30)] == \
        [T.Q6_K if use_more_bits(i, 30) else T.Q4_K for i in range(30)]
    assert mixture_types("Q8_0", smollm2_shapes(), n_layer=30)["blk.3.ffn_down.weight"] == T.Q8_0
    untied = mixture_types("q4_0", smollm2_shapes(tied=False), n_layer=30)
    assert untied["output.weight"] == T.Q8_0 and untied["token_embd.weight"] == T.Q4_0  # 576 % 256 != 0
    with pytest.raises(ValueError, match="q4_k_m"):
        mixture_types("q4_k_x", smollm2_shapes(), n_layer=30)


def test_mixture_gqa_and_70b_rules():
    shapes = {f"blk.{i}.attn_v.weight": (1024, 8192) for i in range(80)} | {"output.weight": (1000, 8192)}
    assert mixture_types("q2_k", shapes, n_layer=80, n_head=64, n_head_kv=8)["blk.5.attn_v.weight"] == T.Q5_K
    assert mixture_types("q2_k", shapes, n_layer=80, n_head=64, n_head_kv=64)["blk.5.attn_v.weight"] == T.Q3_K
    assert mixture_types("q3_k_m", shapes, n_layer=80, n_head=8, n_head_kv=8)["blk.1.attn_v.weight"] == T.Q5_K
    assert mixture_types("q4_k_s", shapes, n_layer=40, n_head=8, n_head_kv=8)["blk.4.attn_v.weight"] == T.Q4_K
