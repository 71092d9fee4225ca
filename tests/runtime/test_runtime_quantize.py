"""`Engine(quantize=...)`: int8 greedy tokens as fp32's on every tiny variant, int4 serving requests end to end
with every KV block back, a GGUF served as it is, and which weights "auto" picks."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.models.quantized_linear import QuantizedLinear
from llmengine_runtime.runtime import LLM, SamplingParams
from tests.fast import fast_subset
from tests.models.test_quantized_linear import assert_greedy_match
from tests.models.tiny import VARIANTS

PROMPTS = [[5, 17, 99, 3, 64, 8, 21], [7, 100, 2, 45], [9] * 6]  # + 16 fit llama-dynamic's 24 positions
GREEDY = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)


def engine_kwargs(**kwargs):
    return dict(device="cpu", kv_cache_gib=0.01, **kwargs)


@pytest.mark.parametrize("variant", fast_subset(VARIANTS, ["falcon-rw-like"]))
def test_int8_engine_greedy_tokens_match_fp32(tiny_dir, variant):
    folder = tiny_dir(variant)
    fp32, int8 = LLM(folder, **engine_kwargs()), LLM(folder, **engine_kwargs(quantize="int8"))
    assert fp32.engine.model.quantization is None and int8.engine.model.quantization == "int8 per channel"
    assert int8.engine.dtype == fp32.engine.dtype  # activations and KV cache: fp32 on CPU either way
    got = [r.token_ids for r in int8.generate(PROMPTS, GREEDY, progress=False)]
    expected = [r.token_ids for r in fp32.generate(PROMPTS, GREEDY, progress=False)]
    assert_greedy_match(fp32.engine.model, PROMPTS, got, expected)


def test_int4_engine_serves_requests_and_returns_blocks(tiny_dir, cache_gib):
    folder = tiny_dir("llama-gqa-tied-bias")
    llm = LLM(folder, device="cpu", kv_cache_gib=cache_gib(folder, 6, 16, torch.float16), quantize="int4",
              quant_group_size=32)
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float16  # "auto" for quantized weights on CPU
    model = llm.engine.model
    assert model.quantization == "int4 g32" and model.lm_head is None  # tied: the quantized copy is the head
    assert isinstance(model.quantized_head, QuantizedLinear) and model.quantized_head.mode == "int4"
    bm = llm.engine.block_manager
    total = bm.num_free
    prompts = PROMPTS * 3  # 2 blocks each (16-token blocks), 6 in all: most wait
    params = [SamplingParams(max_new_tokens=12 + i, temperature=0.7, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    results = llm.generate(prompts, params, progress=False)
    assert [len(r.token_ids) for r in results] == [12 + i for i in range(len(prompts))]
    assert all(r.finish_reason == "length" and r.error is None for r in results)
    assert bm.num_used == 0 and bm.num_free == total == 6  # every block back (free or cached)
    assert not llm.engine.has_unfinished()


def test_auto_with_an_explicit_dtype_is_float(tiny_dir, tmp_path, monkeypatch):
    """quantize="auto" keeps a GGUF's integers only when the dtype is left to the engine too."""
    from gguf import GGMLQuantizationType

    from llmengine_runtime.models.zoo import resolve_model
    from tests.models.test_gguf import write_tiny_gguf

    monkeypatch.setenv("LLMENGINE_MODELS_DIR", str(tmp_path / "models"))
    write_tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.Q4_1)
    folder = resolve_model(tmp_path / "tiny.gguf")
    served = LLM(folder, **engine_kwargs(quantize="auto"))
    assert served.engine.model.quantization == "GGUF Q4_1 x14, Q4_1 (tied head) x1"  # 2 layers x 7
    text = served.generate(["hello world"], GREEDY, progress=False)[0]  # tokenizer from the GGUF's metadata
    assert len(text.token_ids) == 16 and text.error is None
    assert LLM(folder, **engine_kwargs(quantize="auto", dtype="float32")).engine.model.quantization is None
    assert LLM(tiny_dir("llama-mha"), **engine_kwargs(quantize="auto")).engine.model.quantization is None
