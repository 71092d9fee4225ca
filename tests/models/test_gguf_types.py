"""The GGUF type table (models/gguf_types.py): each dequantizer bit-exact against gguf-py's numpy one on random
block bytes, and the types outside the table refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from llmengine_runtime.models.gguf_types import TYPES, UnsupportedGGUFType, gguf_type, raw_rows

Q = GGMLQuantizationType
# Byte offsets of each type's fp16 scale fields inside a block (ggml's block structs): random bytes there could
# be inf or NaN, so the tests write finite fp16 values into them.
FP16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
               Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
QUANTIZED = list(FP16_FIELDS)
SHAPES = [(1, 256), (3, 512), (17, 768), (5, 1024)]  # ragged row counts, several K's (all whole 256-blocks)
SMALL_K = [(7, 32), (2, 96)]  # 32-block types: rows of 1 and 3 blocks


def random_rows(qtype: GGMLQuantizationType, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 `[n, row_bytes]`: random integer fields and random finite fp16 scales (float types: random finite
    values, some tiny and some negative)."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal((n, k)) * np.exp(rng.uniform(-20, 5, (n, k)))
        if qtype == Q.F32:
            return values.astype(np.float32).view(np.uint8)
        if qtype == Q.F16:
            return values.astype(np.float16).view(np.uint8)
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:  # magnitudes over fp16's range, subnormals included, both signs
        scales = (rng.standard_normal(len(blocks)) * np.exp(rng.uniform(-18, 4, len(blocks)))).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, k // block * size)


def assert_bit_exact(got: torch.Tensor, expected: np.ndarray) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    same = got.numpy().view(np.uint32) == expected.astype(np.float32).view(np.uint32)
    assert same.all(), f"{(~same).sum()} of {same.size} differ, e.g. {got.numpy()[~same][:4]} vs {expected[~same][:4]}"


def test_table_matches_ggml_sizes():
    assert [t.name for t in TYPES.values()] == ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    for qtype, entry in TYPES.items():
        assert (entry.block, entry.block_bytes) == GGML_QUANT_SIZES[qtype], qtype.name
        assert entry.activation == (None if entry.block == 1 else "Q8_0" if entry.block == 32 else "Q8_K")


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_dequantize_is_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    shapes = SHAPES + (SMALL_K if TYPES[qtype].block <= 32 else [])
    for n, k in shapes:
        raw = random_rows(qtype, n, k, rng)
        expected = dequantize(raw, qtype).reshape(n, k)
        assert np.isfinite(expected).all()
        got = TYPES[qtype].dequantize(torch.from_numpy(raw), k)
        assert_bit_exact(got, expected)
        rows = [n - 1, 0, n // 2, n - 1]  # a few rows, out of order and repeated: as an embedding lookup takes them
        assert_bit_exact(TYPES[qtype].dequantize(torch.from_numpy(raw)[rows], k), expected[rows])


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_single_bit_flips_stay_bit_exact(qtype):
    """Every bit of a block, flipped alone, moves the weights as it moves gguf-py's: each field is read from where
    ggml puts it (a misplaced field could hide in random data; one bit at a time it cannot)."""
    rng = np.random.default_rng(1)
    entry = TYPES[qtype]
    raw = random_rows(qtype, 1, entry.block, rng)
    changed = 0
    for byte in range(entry.block_bytes):
        for bit in range(8):
            flipped = raw.copy()
            flipped[0, byte] ^= 1 << bit
            expected = dequantize(flipped, qtype).reshape(1, -1)
            if np.isfinite(expected).all():
                assert_bit_exact(entry.dequantize(torch.from_numpy(flipped), entry.block), expected)
                changed += not np.array_equal(expected, dequantize(raw, qtype).reshape(1, -1))
    assert changed > 0.9 * 8 * entry.block_bytes  # nearly every bit matters to gguf-py, so the check has teeth


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.IQ4_NL, Q.TQ1_0, Q.TQ2_0, Q.MXFP4, Q.Q8_K, Q.I8],
                         ids=lambda t: t.name)
def test_other_types_are_refused_by_name(qtype):
    with pytest.raises(UnsupportedGGUFType, match=rf"'blk\.3\.ffn_up\.weight' has type {qtype.name}, which is not "
                                                  r"supported \(supported: F32, F16, BF16, Q4_0.*Q6_K\)"):
        gguf_type(qtype, "blk.3.ffn_up.weight")
    with pytest.raises(ValueError, match="number 9999"):
        gguf_type(9999)


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="Q4_K rows are whole blocks of 256; K = 96"):
        TYPES[Q.Q4_K].row_bytes(96)
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 144\]"):
        TYPES[Q.Q4_K].dequantize(torch.zeros(2, 143, dtype=torch.uint8), 256)


def test_raw_rows_of_a_gguf_file(tmp_path):
    """raw_rows gives a file's bytes as they are, for a quantized and a float tensor."""
    from gguf import GGUFReader, GGUFWriter

    rng = np.random.default_rng(2)
    q6 = random_rows(Q.Q6_K, 3, 512, rng)
    f16 = rng.standard_normal((4, 64)).astype(np.float16)
    writer = GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tensor("a.weight", q6, raw_dtype=Q.Q6_K)
    writer.add_tensor("b.weight", f16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    a, b = GGUFReader(tmp_path / "t.gguf").tensors
    assert torch.equal(raw_rows(a), torch.from_numpy(q6))
    assert torch.equal(raw_rows(b), torch.from_numpy(f16.view(np.uint8)))
    assert torch.equal(TYPES[Q.F16].dequantize(raw_rows(b), 64), torch.from_numpy(f16.astype(np.float32)))
