"""Our GGUF quantizers and mixtures against llama.cpp's own output (tests/data/gguf_quantize, written by
make_golden.py with llama-cpp-python's `llama_model_quantize` from the F32 inputs beside it): every tensor of every
file type, byte for byte, and every tensor's type."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from llmengine_runtime.models.gguf_quantize import QUANTIZABLE_TYPES, quantize_rows
from llmengine_runtime.models.gguf_quantize_mix import mixture_types

DATA = Path(__file__).parents[1] / "data" / "gguf_quantize"
FIXTURES = {"tied": dict(n_layer=8), "untied": dict(n_layer=3)}  # make_golden.py: head_count 4, head_count_kv 2


def read_inputs(name: str) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in GGUFReader(DATA / f"{name}_f32.gguf").tensors}


def read_golden(name: str) -> dict[str, dict[str, tuple[GGMLQuantizationType, np.ndarray]]]:
    """file type -> {tensor: (type llama.cpp chose, its bytes [rows, row_bytes])} for the quantized tensors."""
    golden: dict[str, dict] = defaultdict(dict)
    for t in GGUFReader(DATA / f"{name}_golden.gguf").tensors:
        ftype, tensor = t.name.split("/", 1)
        golden[ftype][tensor] = (GGMLQuantizationType(t.tensor_type), np.array(t.data))
    return golden


@pytest.mark.parametrize("name", FIXTURES)
def test_quantized_bytes_equal_llama_cpp(name):
    """Every (tensor, type) llama.cpp wrote in any file type: our bytes equal its bytes. Rows of one width and
    type are quantized together (each row on its own, so stacking them changes nothing)."""
    inputs, golden = read_inputs(name), read_golden(name)
    cases: dict[tuple[GGMLQuantizationType, int], dict[str, np.ndarray]] = defaultdict(dict)
    for tensors in golden.values():
        for tensor, (qtype, data) in tensors.items():
            previous = cases[(qtype, inputs[tensor].shape[1])].setdefault(tensor, data)
            assert np.array_equal(previous, data)  # llama.cpp's bytes depend on the tensor and type only
    assert {qtype for qtype, _ in cases} == set(QUANTIZABLE_TYPES) or name == "untied"
    for (qtype, _), tensors in cases.items():
        rows = torch.from_numpy(np.concatenate([inputs[t] for t in tensors]))
        ours = quantize_rows(rows, qtype).numpy()
        expected = np.concatenate(list(tensors.values()))
        bad = np.flatnonzero((ours != expected).any(axis=1))
        assert bad.size == 0, f"{qtype.name}: {bad.size} of {len(expected)} rows differ from llama.cpp's"


@pytest.mark.parametrize("name", FIXTURES)
def test_mixture_types_equal_llama_cpp(name):
    """Every file type: the type of every tensor is the one llama.cpp chose (F32 for what it left alone: norms,
    single rows)."""
    shapes = {tensor: array.shape for tensor, array in read_inputs(name).items()}
    golden = read_golden(name)
    assert len(golden) == 12
    for ftype, tensors in golden.items():
        ours = mixture_types(ftype, shapes, n_head=4, n_head_kv=2, **FIXTURES[name])
        expected = {t: tensors[t][0] if t in tensors else GGMLQuantizationType.F32 for t in shapes}
        assert ours == expected, ftype


def test_golden_fixture_covers_the_rules():
    """The fixture exercises what the mixture decides: a tied and an own output, the fallbacks of each k-quant,
    use_more_bits layers of attn_v and ffn_down, and a one-row tensor left F32."""
    tied, untied = read_golden("tied"), read_golden("untied")
    T = GGMLQuantizationType
    q4km = {t: qtype for t, (qtype, _) in tied["Q4_K_M"].items()}
    assert q4km["token_embd.weight"] == T.Q6_K and q4km["blk.0.attn_output.weight"] == T.Q5_0  # width 96
    assert [q4km[f"blk.{i}.attn_v.weight"] for i in range(8)] == [T.Q6_K, T.Q4_K, T.Q4_K, T.Q6_K, T.Q4_K, T.Q4_K,
                                                                   T.Q6_K, T.Q6_K]
    assert untied["Q4_K_M"]["output.weight"][0] == T.Q6_K and untied["Q4_K_M"]["token_embd.weight"][0] == T.Q5_0
    assert tied["Q6_K"]["blk.0.attn_output.weight"][0] == T.Q8_0
    assert tied["Q5_K_S"]["blk.0.attn_output.weight"][0] == T.Q5_1
    assert tied["Q2_K"]["blk.0.attn_output.weight"][0] == T.Q4_0
    assert "blk.0.ffn_up.weight" not in untied["Q4_K_M"]  # a single row: a vector to ggml, kept F32
