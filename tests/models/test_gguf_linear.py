"""The GGUF layers (models/gguf_linear.py) on random block bytes of every table type, against float64 products of
gguf-py's dequantized weights: the C++ product within its activation rounding, rows independent of the batch; the
dequantized fallback within fp32 arithmetic; fused parts, the embedding's lookups and the tied head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from llmengine_runtime.models.gguf_linear import GGUFEmbedding, GGUFLinear, GGUFRowParts
from llmengine_runtime.models.gguf_types import TYPES, UnsupportedGGUFType, has_cpu_product
from tests.models.test_gguf_types import FP16_FIELDS, random_rows

Q = GGMLQuantizationType
QUANTIZED = list(FP16_FIELDS)
FP32_SUMS = 1e-5  # fp32 summation over K <= 512, relative to sum |x| |w| (a generous bound on the roundoff)


def weights(qtype, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw uint8 [n, row_bytes], gguf-py's dequantization as float64 [n, k])."""
    raw = random_rows(qtype, n, k, np.random.default_rng(seed))
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, qtype).reshape(n, k).astype(np.float64))


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    """fp32 [m, k] with magnitudes varying along k (blocks of very different size)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.exp(torch.randn(1, k, generator=g))).float()


def rounded(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the product quantizes it (gguf_blocks.h): per `block` k's, xd = max|x| / 127 and xq = round half to
    even of x * (1 / xd), in fp32; returned as xd * xq in float64."""
    xb = x.float().unflatten(-1, (-1, block))
    xd = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(xd > 0, 1 / xd, torch.zeros_like(xd))
    return (torch.round(xb * inv).double() * xd.double()).flatten(-2)


CASES = [(1, 5, 256), (3, 33, 512), (17, 7, 256)]  # (M, N, K): ragged rows and outputs, one and two 256-blocks


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_cpu_product_within_its_activation_rounding(qtype):
    if not has_cpu_product(qtype):
        pytest.skip("the C++ gguf_linear is not built here")
    block = TYPES[qtype].block
    for m, n, k in CASES + ([(4, 9, 96)] if block == 32 else []):
        raw, w = weights(qtype, n, k, seed=m)
        x, bias = activations(m, k, seed=n), torch.randn(n)
        layer = GGUFLinear(raw, qtype, k, bias)
        assert layer.backend == "cpu"
        y = layer(x).double()
        terms = x.double().abs() @ w.abs().T
        # |x - rounded(x)| <= xd / 2 = max|x_block| / 254 per element
        step = (x.double().abs().unflatten(-1, (-1, block)).amax(-1) / 254)
        bound = step @ w.abs().unflatten(-1, (-1, block)).sum(-1).T
        reference = x.double() @ w.T + bias.double()
        last = 2.0 ** -22 * y.abs()  # the fp32 rounding of the sum with the bias
        assert ((y - reference).abs() <= bound * 1.001 + FP32_SUMS * terms + last).all()
        # and exactly that rounding: near the float64 product of the rounded x
        assert ((y - (rounded(x, block) @ w.T + bias.double())).abs() <= FP32_SUMS * terms + last).all()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_1, Q.Q8_0, Q.Q3_K, Q.Q6_K], ids=lambda t: t.name)
def test_cpu_rows_do_not_depend_on_the_batch(qtype):
    if not has_cpu_product(qtype):
        pytest.skip("the C++ gguf_linear is not built here")
    raw, _ = weights(qtype, 40, 512, seed=3)
    layer, x = GGUFLinear(raw, qtype, 512), activations(19, 512, seed=4)
    batch = layer(x)
    for i in range(len(x)):
        assert torch.equal(layer(x[i:i + 1]), batch[i:i + 1])
    assert torch.equal(layer(x[5:12]), batch[5:12])


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_dequantized_path(qtype, monkeypatch):
    """Without our kernels: F.linear over the exact weights (dequantized once, kept), in x's dtype."""
    monkeypatch.setenv("LLMENGINE_CPU_KERNELS", "0")
    raw, w = weights(qtype, 33, 512, seed=5)
    x, bias = activations(3, 512, seed=6), torch.randn(33)
    layer = GGUFLinear(raw, qtype, 512, bias)
    assert layer.backend == "dequantized" and layer.dense is None
    assert torch.equal(layer.dequantize(), w.float())
    y = layer(x).double()
    assert ((y - (x.double() @ w.T + bias.double())).abs() <= FP32_SUMS * (x.double().abs() @ w.abs().T)).all()
    dense = layer.dense
    assert dense is not None and layer(x[:1]) is not None and layer.dense is dense  # made once
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and layer.dense.dtype == torch.bfloat16


def test_row_parts_concatenate_their_outputs():
    (q4k, _), (q6k, _) = weights(Q.Q4_K, 8, 256, seed=7), weights(Q.Q6_K, 4, 256, seed=8)
    x, bias = activations(5, 256, seed=9), torch.randn(12)
    fused = GGUFRowParts([GGUFLinear(q4k, Q.Q4_K, 256), GGUFLinear(q6k, Q.Q6_K, 256)], bias)
    assert (fused.in_features, fused.out_features) == (256, 12)
    expected = torch.cat([GGUFLinear(q4k, Q.Q4_K, 256)(x), GGUFLinear(q6k, Q.Q6_K, 256)(x)], -1) + bias
    assert torch.equal(fused(x), expected)
    assert torch.equal(fused.dequantize(), torch.cat([TYPES[Q.Q4_K].dequantize(q4k, 256),
                                                      TYPES[Q.Q6_K].dequantize(q6k, 256)]))


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q4_K, Q.Q5_0, Q.BF16], ids=lambda t: t.name)
def test_embedding_lookups_and_tied_head(qtype):
    raw, table = weights(qtype, 50, 256, seed=10)
    embedding = GGUFEmbedding(raw, qtype, 256)
    ids = torch.tensor([[3, 0, 49], [3, 7, 7]])
    assert torch.equal(embedding(ids), table.float()[ids])
    assert embedding(ids[0]).shape == (3, 256) and embedding(torch.tensor([], dtype=torch.long)).shape == (0, 256)
    assert GGUFEmbedding(raw, qtype, 256, torch.bfloat16)(ids).dtype == torch.bfloat16
    weight = embedding.weight  # what callers read for the model's dtype and device; the rows are in raw
    assert weight.shape == (0, 256) and weight.dtype == torch.float32 and weight.device == raw.device
    head = embedding.tied_head()
    assert head.raw is embedding.raw and (head.in_features, head.out_features) == (256, 50)
    x = activations(2, 256, seed=11)
    assert torch.allclose(head(x).double(), x.double() @ table.T, rtol=0,
                          atol=0.02 * (x.double().abs() @ table.abs().T).max().item())


def test_layers_check_what_they_are_given():
    raw, _ = weights(Q.Q4_K, 4, 256, seed=12)
    with pytest.raises(ValueError, match=r"Q4_K weights of 512 columns are uint8 \[N, 288\]"):
        GGUFLinear(raw, Q.Q4_K, 512)
    with pytest.raises(ValueError, match="whole blocks of 256; K = 96"):
        GGUFLinear(raw, Q.Q4_K, 96)
    with pytest.raises(ValueError, match=r"bias \(5,\) does not fit 4 rows"):
        GGUFLinear(raw, Q.Q4_K, 256, torch.zeros(5))
    with pytest.raises(UnsupportedGGUFType, match="IQ2_XXS"):
        GGUFLinear(torch.zeros(4, 66, dtype=torch.uint8), Q.IQ2_XXS, 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_dequantizes_once_to_the_model_dtype():
    """On CUDA the bytes are dequantized on the device (the same bits as on the CPU) and F.linear runs in x's
    dtype: not a quantized kernel."""
    for qtype in QUANTIZED:
        raw, w = weights(qtype, 64, 512, seed=13)
        layer = GGUFLinear(raw.cuda(), qtype, 512)
        assert layer.backend == "dequantized" and torch.equal(layer.dequantize().cpu(), w.float())
        x = activations(4, 512, seed=14).cuda().bfloat16()
        y = layer(x)
        assert y.dtype == torch.bfloat16 and layer.dense.dtype == torch.bfloat16
        assert torch.equal(y, torch.nn.functional.linear(x, w.float().cuda().bfloat16()))
        embedding = GGUFEmbedding(raw.cuda(), qtype, 512, torch.bfloat16)
        assert torch.equal(embedding(torch.tensor([5, 1], device="cuda")).cpu(), w.float()[[5, 1]].bfloat16())
