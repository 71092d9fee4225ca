"""GGUF Q4_0 / Q4_1 / Q8_0 tensors mapped to integer weights: exact against gguf's own dequantization, up to the
storage rounding of the scales, with llama.cpp's rotary row order undone as models/gguf.py does."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from llmengine_runtime.models.gguf import to_hf_tensor
from llmengine_runtime.models.gguf_quant import (
    concat_rows,
    gguf_int_weights,
    quantized_linear,
    quantized_linear_from_gguf,
)

TYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]
CONFIG = {"num_attention_heads": 4, "num_key_value_heads": 2}
N, K = 64, 96
# Tolerances. The integer form only reassociates gguf's fp32 arithmetic (`(q - 8) d + (m + 8d)` for `q d + m`):
# a few fp32 ulps of the largest term. On CPU the scales are stored in bf16 (u = 2^-8), so each weight moves by
# at most u (|q - 8| d + |zero|) (int4) or u |q| d (int8); on CUDA they are fp16, which holds GGUF's fp16 d and m
# exactly.
FP32_ULPS = 4 * 2.0 ** -23
BF16_U = 2.0 ** -8


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A GGUF with one random `[N, K]` tensor per type, plus a Q4_1 q and k projection, read back by GGUFReader."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tensors.gguf"
    writer = GGUFWriter(str(path), "llama")
    names = {f"blk.0.{qtype.name}.weight": qtype for qtype in TYPES}
    names.update({"blk.0.attn_q.weight": GGMLQuantizationType.Q4_1, "blk.0.attn_k.weight": GGMLQuantizationType.Q8_0})
    for name, qtype in names.items():
        weight = (rng.standard_normal((N, K)) * rng.uniform(0.01, 0.2, (N, 1)) + 0.05).astype(np.float32)
        writer.add_tensor(name, quantize(weight, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {t.name: t for t in GGUFReader(path).tensors}


def reference(tensor) -> np.ndarray:
    return dequantize(tensor.data, tensor.tensor_type).reshape(N, K)


def int_form(weights) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized fp32, |terms|) of a GGUFIntWeights: the weights and the size of what went into them
    (Q4_0's d is negative when a block's largest magnitude is positive)."""
    scale = np.repeat(weights.scale, weights.group_size, 1)
    if weights.mode == "int8":
        return weights.q * scale, np.abs(weights.q * scale)
    zero = np.repeat(weights.zero, weights.group_size, 1)
    return (weights.q.astype(np.float32) - 8) * scale + zero, np.abs((weights.q - 8.0) * scale) + np.abs(zero)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_integer_form_is_exact(gguf_file, qtype):
    tensor = gguf_file[f"blk.0.{qtype.name}.weight"]
    weights = gguf_int_weights(tensor)
    assert weights.mode == ("int8" if qtype == GGMLQuantizationType.Q8_0 else "int4") and weights.group_size == 32
    assert weights.q.shape == (N, K) and weights.scale.shape == (N, K // 32)
    assert weights.q.min() >= (-128 if weights.mode == "int8" else 0) and weights.q.max() <= 127
    got, terms = int_form(weights)
    np.testing.assert_array_less(np.abs(got - reference(tensor)), FP32_ULPS * terms + 1e-30)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_cpu_layer_keeps_the_fp16_scales(gguf_file, qtype):
    """Our CPU kernels store the file's fp16 scales as they are: exact up to fp32 arithmetic."""
    tensor = gguf_file[f"blk.0.{qtype.name}.weight"]
    layer = quantized_linear_from_gguf(tensor)
    assert layer.backend == "cpu" and (layer.out_features, layer.in_features) == (N, K)
    _, terms = int_form(gguf_int_weights(tensor))
    np.testing.assert_array_less(np.abs(layer.dequantize().numpy() - reference(tensor)), FP32_ULPS * terms + 1e-30)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_torch_cpu_layer_within_bf16_scale_rounding(gguf_file, qtype, monkeypatch):
    monkeypatch.setenv("LLMENGINE_CPU_KERNELS", "0")  # torch's kernels: bf16 scales
    tensor = gguf_file[f"blk.0.{qtype.name}.weight"]
    layer = quantized_linear_from_gguf(tensor)
    assert layer.backend == "torch" and (layer.out_features, layer.in_features) == (N, K)
    _, terms = int_form(gguf_int_weights(tensor))
    err = np.abs(layer.dequantize().numpy() - reference(tensor))
    np.testing.assert_array_less(err, (BF16_U + FP32_ULPS) * terms + 1e-30)
    assert err.max() > 0  # bf16 did round some scale: the test can tell


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_triton_layer_is_exact(gguf_file, qtype, monkeypatch):
    monkeypatch.setenv("LLMENGINE_FORCE_TRITON", "1")
    tensor = gguf_file[f"blk.0.{qtype.name}.weight"]
    layer = quantized_linear_from_gguf(tensor)
    assert layer.backend == "triton" and layer.scale.dtype == torch.float16
    _, terms = int_form(gguf_int_weights(tensor))
    np.testing.assert_array_less(np.abs(layer.dequantize().numpy() - reference(tensor)), FP32_ULPS * terms + 1e-30)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.attn_k.weight"])
def test_rotary_rows_match_the_float_import(gguf_file, name):
    """q and k rows (with their scales and zeros) come back in HF order, as models/gguf.py's float import."""
    tensor = gguf_file[name]
    expected = to_hf_tensor(tensor, CONFIG)
    assert not np.array_equal(expected, reference(tensor))  # the permutation moves rows
    layer = quantized_linear_from_gguf(tensor, CONFIG)
    _, terms = int_form(gguf_int_weights(tensor, CONFIG["num_attention_heads" if "attn_q" in name else
                                                        "num_key_value_heads"]))
    np.testing.assert_array_less(np.abs(layer.dequantize().numpy() - expected), (BF16_U + FP32_ULPS) * terms + 1e-30)
    with pytest.raises(ValueError, match="config"):
        quantized_linear_from_gguf(tensor)


def test_fused_rows(gguf_file):
    """A Q4_1 q projection (rows un-permuted) and another Q4_1 tensor stacked along N, as for qkv_proj."""
    q_proj, other = gguf_file["blk.0.attn_q.weight"], gguf_file["blk.0.Q4_1.weight"]
    parts = [gguf_int_weights(q_proj, CONFIG["num_attention_heads"]), gguf_int_weights(other)]
    fused = concat_rows(parts)
    layer = quantized_linear(fused)
    expected = np.concatenate([to_hf_tensor(q_proj, CONFIG), reference(other)])
    terms = np.concatenate([int_form(p)[1] for p in parts])
    np.testing.assert_array_less(np.abs(layer.dequantize().numpy() - expected), (BF16_U + FP32_ULPS) * terms + 1e-30)
    with pytest.raises(ValueError, match="fuse"):
        concat_rows([parts[0], gguf_int_weights(gguf_file["blk.0.Q8_0.weight"])])


def test_other_types_are_refused(tmp_path):
    path = tmp_path / "f32.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.ones((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="F32"):
        gguf_int_weights(GGUFReader(path).tensors[0])


@pytest.mark.slow  # GGUFReader parses the file's metadata (49152 tokens and their merges): 3-10 s here
def test_default_gguf(default_gguf):
    """The default model's file holds Q4_1 projections and a Q8_0 embedding (its tied head)."""
    reader = GGUFReader(default_gguf)
    tensors = {t.name: t for t in reader.tensors}
    types = {GGMLQuantizationType(t.tensor_type) for t in reader.tensors}
    assert {GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0} <= types
    config = {key: int(reader.fields[f"llama.attention.{field}"].contents())
              for key, field in (("num_attention_heads", "head_count"), ("num_key_value_heads", "head_count_kv"))}
    q_proj = tensors["blk.0.attn_q.weight"]
    assert GGMLQuantizationType(q_proj.tensor_type) == GGMLQuantizationType.Q4_1
    layer = quantized_linear_from_gguf(q_proj, config)
    expected = to_hf_tensor(q_proj, config)
    terms = int_form(gguf_int_weights(q_proj, config["num_attention_heads"]))[1]
    np.testing.assert_array_less(np.abs(layer.dequantize().numpy() - expected), (BF16_U + FP32_ULPS) * terms + 1e-30)
    table = tensors["token_embd.weight"]
    assert GGMLQuantizationType(table.tensor_type) == GGMLQuantizationType.Q8_0
    rows = SimpleNamespace(name=table.name, tensor_type=table.tensor_type, shape=np.array([table.shape[0], 4096]),
                           data=table.data[:4096])  # the first 4096 of 49152 rows: the whole table takes seconds
    got, terms = int_form(gguf_int_weights(rows))
    expected = dequantize(rows.data, rows.tensor_type).reshape(got.shape)
    np.testing.assert_array_less(np.abs(got - expected), FP32_ULPS * terms + 1e-30)
