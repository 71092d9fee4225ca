"""benchmarks/gguf_formats*.py without llama.cpp: the random GGUF it writes (a small shape) loads and serves in our
engine with the padded tokenizer, the F32 export keeps every weight exactly, and the report renders."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from llmengine_runtime.benchmarks import gguf_formats, gguf_formats_files
from llmengine_runtime.benchmarks.gguf_formats_files import Shape, export_f32_gguf, random_gguf

VOCAB = 500  # the tiny tokenizer's tokens, then fillers


@pytest.fixture
def small_shape(monkeypatch):
    monkeypatch.setitem(gguf_formats_files.SHAPES, "test-small", Shape(64, 128, 2, 4, 2, VOCAB))
    return "test-small"


@pytest.fixture
def tokenizer_gguf(tmp_path):
    """A small GPT-2 tokenizer in a GGUF (reading the shipped file's 49152 tokens takes seconds)."""
    from tests.models.test_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "tokenizer.gguf")
    return tmp_path / "tokenizer.gguf"


def test_random_gguf_serves_in_our_engine(tmp_path, small_shape, tokenizer_gguf):
    from llmengine_runtime.models.gguf_model import gguf_model_folder
    from llmengine_runtime.runtime import LLM, SamplingParams

    path = random_gguf(small_shape, seed=3, root=tmp_path, tokenizer_source=tokenizer_gguf)
    assert random_gguf(small_shape, seed=3, root=tmp_path) == path  # cached
    reader = GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == VOCAB and tokens[-1] == f"<filler_{VOCAB - 1}>"
    types = {t.name: GGMLQuantizationType(t.tensor_type) for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == GGMLQuantizationType.F16 and len(types) == 2 + 2 * 9
    llm = LLM(gguf_model_folder(path, tmp_path / "folders"), device="cpu", dtype="float32", kv_cache_gib=0.01,
              quantize="gguf")
    out = llm.generate([[5, 6, 7, VOCAB - 1]], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True),
                       progress=False)[0]
    assert len(out.token_ids) == 4 and out.error is None
    assert llm.tokenizer.encode("hello", add_special_tokens=False)  # the copied BPE tokenizer works


def test_f32_export_is_exact(tmp_path, small_shape, tokenizer_gguf):
    source = random_gguf(small_shape, seed=4, root=tmp_path, tokenizer_source=tokenizer_gguf)
    f32 = export_f32_gguf(source, root=tmp_path)
    theirs = {t.name: t for t in GGUFReader(source).tensors}
    for t in GGUFReader(f32).tensors:
        assert GGMLQuantizationType(t.tensor_type) == GGMLQuantizationType.F32
        src = theirs[t.name]
        expected = dequantize(np.asarray(src.data), GGMLQuantizationType(src.tensor_type))
        assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected)


def test_markdown_renders():
    row = dict(type="Q4_K_M", weight_mb=80.0, b1_tok_s=100.0, b1_gb_s=8.0, b1_read_fraction=0.4, b8_tok_s=300.0,
               pp512_tok_s=900.0)
    report = {"shape": "smollm2-135m", "threads": 2, "read_gb_s": 20.0, "max_new_tokens": 64, "repeats": 3,
              "rows": [dict(row, engine="ours", b1_vs_llamacpp=1.5, b8_vs_llamacpp=1.2, pp512_vs_llamacpp=0.9,
                            greedy_same_as_llamacpp=64), dict(row, engine="llama.cpp")]}
    text = gguf_formats.markdown(report)
    assert "1.50x, 1.20x, 0.90x" in text and "8.0 (40%)" in text and "64/64" in text
