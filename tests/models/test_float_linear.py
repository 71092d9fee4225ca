"""A bf16 or fp16 checkpoint on the CPU (models/float_linear.py): projections keep their dtype in our product's
layout, the rest computes in fp32; the C++ step runs it with the eager blocks' numbers, bit for bit, for decode rows,
prompt chunks and speculative verification; its logits stay within the weights' rounding of the fp32 model's."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.models.float_linear import FloatLinear, amx_bf16_tiles
from llmengine_runtime.models.layers import Linear
from llmengine_runtime.models.loader import load_model
from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.executor import CpuStepExecutor
from tests.fast import fast_subset

PROMPTS = [[5, 17, 99, 3, 64, 8, 21, 5, 17, 99, 3, 64, 8], [7, 100, 2, 45] * 5, [9] * 40]



@pytest.mark.parametrize("dtype", fast_subset([torch.bfloat16, torch.float16], [torch.bfloat16]))
def test_the_loader_keeps_projection_weights_in_their_dtype(tiny_dirs, dtype):
    path = tiny_dirs["llama-gqa-tied-bias"]
    model = load_model(path, dtype=dtype, progress=False)
    ref = load_model(path, progress=False, pack=False)
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert model.quantization == f"{str(dtype).removeprefix('torch.')} weights, fp32 activations"
    qkv, ref_qkv = model.layers[0].attn.qkv_proj, ref.layers[0].attn.qkv_proj
    assert isinstance(qkv, FloatLinear) and qkv.weight_dtype == dtype
    assert torch.equal(qkv.dequantize(), ref_qkv.weight.to(dtype).float())
    assert torch.equal(qkv.bias, ref_qkv.bias.to(dtype).float())  # the checkpoint's values, loaded as `dtype`
    assert isinstance(model.quantized_head, FloatLinear)  # the tied head's own copy
    assert torch.equal(model.quantized_head.dequantize(), ref.embed.weight.to(dtype).float())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # norms and embedding: fp32 of `dtype`'s values
    assert torch.equal(model.embed.weight, ref.embed.weight.to(dtype).float())


@pytest.mark.slow  # two models of its own
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.03), (torch.float16, 0.004)])
def test_logits_within_the_weights_rounding_of_fp32(tiny_dirs, dtype, tolerance):
    path = tiny_dirs["llama-gqa-tied-bias"]
    model, ref = load_model(path, dtype=dtype, progress=False), load_model(path, progress=False)
    ids = torch.tensor([5, 9, 3, 7, 1, 2, 8, 4, 6, 11, 13, 17])
    meta = AttentionMetadata.for_prompts([len(ids)])
    with torch.no_grad():
        got = model.compute_logits(model(ids, torch.arange(len(ids)), meta))
        want = ref.compute_logits(ref(ids, torch.arange(len(ids)), AttentionMetadata.for_prompts([len(ids)])))
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < tolerance * want.abs().max()


def generate(path, dtype: str, fused: bool, monkeypatch, **engine_kwargs) -> tuple[list, LLM]:
    monkeypatch.setenv("LLMENGINE_FUSED_DECODE", "1" if fused else "0")
    llm = LLM(path, dtype=dtype, block_size=16, **{"cpu_threads": 2, **engine_kwargs})
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, return_token_log_probs=True)
    return [(r.token_ids, r.log_probs) for r in llm.generate(PROMPTS, params, progress=False)], llm


@pytest.mark.parametrize("variant", fast_subset(["llama-gqa-tied-bias", "llama-mha", "llama3-rope"],
                                                ["llama-gqa-tied-bias"]))
@pytest.mark.parametrize("dtype", fast_subset(["bfloat16", "float16"], ["bfloat16"]))
def test_the_cpp_step_gives_the_eager_numbers(tiny_dirs, variant, dtype, monkeypatch):
    fused, llm = generate(tiny_dirs[variant], dtype, True, monkeypatch)
    assert isinstance(llm.engine.runner.executor, CpuStepExecutor)
    assert llm.engine.kv_cache_dtype == torch.float16  # "auto" for fp32 activations over low-precision weights
    eager, llm = generate(tiny_dirs[variant], dtype, False, monkeypatch)
    assert not isinstance(llm.engine.runner.executor, CpuStepExecutor)
    assert fused == eager  # tokens and log-probs, bit for bit


@pytest.mark.slow  # engines of their own
@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_chunks_and_verification_through_the_step(tiny_dirs, speculative, monkeypatch):
    """Prompt chunks of 5 tokens beside decode rows, or n-gram verification rows: the eager numbers."""
    kwargs = dict(max_num_batched_tokens=5 if speculative is None else 2048, speculative=speculative,
                  enable_prefix_caching=False)
    fused, llm = generate(tiny_dirs["llama-gqa-tied-bias"], "bfloat16", True, monkeypatch, **kwargs)
    eager, _ = generate(tiny_dirs["llama-gqa-tied-bias"], "bfloat16", False, monkeypatch, **kwargs)
    assert fused == eager
    if speculative:
        assert llm.engine.stats()["spec_accepted_tokens"] > 0


@pytest.mark.slow  # engines of their own
def test_a_request_gets_the_same_numbers_alone_or_in_a_batch(tiny_dirs, monkeypatch):
    """The products' rows do not depend on the rows beside them (unlike oneDNN's): batch invariance holds."""
    together, llm = generate(tiny_dirs["llama-gqa-tied-bias"], "bfloat16", True, monkeypatch)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, return_token_log_probs=True)
    alone = [(r.token_ids, r.log_probs) for p in PROMPTS for r in llm.generate([p], params, progress=False)]
    assert alone == together


@pytest.mark.slow  # engines of their own
def test_falcon_keeps_the_eager_blocks_over_float_weights(tiny_dirs, monkeypatch):
    """Falcon is not in the C++ step yet: its eager blocks run over the same FloatLinear products."""
    results, llm = generate(tiny_dirs["falcon-7b-like"], "bfloat16", True, monkeypatch)
    assert isinstance(llm.engine.model.layers[0].attn.qkv_proj, FloatLinear)
    assert all(len(tokens) == 16 for tokens, _ in results)


def test_switched_off_by_environment(tiny_dirs, monkeypatch):
    monkeypatch.setenv("LLMENGINE_FLOAT_WEIGHTS", "0")
    model = load_model(tiny_dirs["llama-gqa-tied-bias"], dtype=torch.bfloat16, progress=False, pack=False)
    assert not any(isinstance(m, FloatLinear) for m in model.modules()) and model.quantization is None


@pytest.mark.slow  # engines of their own
def test_the_cpp_step_over_cut_amx_tiles_gives_the_eager_numbers(tiny_dirs, monkeypatch):
    """With bf16 weights on AMX tiles (kernels/cpu/bf16_amx.cpp), three threads share each projection's output rows
    at N * t / 3: ranges that start and end inside 16-column tiles, which the step computes whole and copies (the
    eager blocks' op gives each thread whole tiles)."""
    if not amx_bf16_tiles():
        pytest.skip("no AMX-BF16 here (the vector path's thread shares are tested above)")
    results = []
    for fused in (True, False):
        got, llm = generate(tiny_dirs["llama-gqa-tied-bias"], "bfloat16", fused, monkeypatch, cpu_threads=3)
        qkv = llm.engine.model.layers[0].attn.qkv_proj
        assert qkv.tiles and qkv.out_features % 48  # so N * t / 3 cuts a tile
        results.append(got)
    assert results[0] == results[1]
