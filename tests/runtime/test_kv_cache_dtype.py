"""`kv_cache_dtype`: which type "auto" picks, what is refused, and that an fp16 cache changes the numbers only by
its rounding (decode steps, and prompt chunks that read earlier chunks back from the cache)."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.runtime import LLM, SamplingParams
from llmengine_runtime.runtime.engine_setup import resolve_kv_cache_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
PROMPTS = [[5, 17, 99, 3, 64, 8, 21, 40, 2, 11, 90, 13, 1, 8, 7, 66, 31, 20, 4, 9], [7, 100, 2, 45]]


@pytest.mark.parametrize("name, model_dtype, device, quantized, tp, expected", [
    ("auto", torch.float32, CPU, True, False, torch.float16),  # the default model as served
    ("auto", torch.float32, CPU, False, False, torch.float32),
    ("auto", torch.bfloat16, CPU, True, False, torch.bfloat16),
    ("auto", torch.float32, CPU, True, True, torch.float32),  # tensor-parallel workers keep the model's type
    ("auto", torch.bfloat16, CUDA, True, False, torch.bfloat16),
    ("float16", torch.float32, CPU, False, False, torch.float16),
    ("float32", torch.float32, CPU, True, False, torch.float32),
    ("bfloat16", torch.bfloat16, CUDA, False, False, torch.bfloat16),
])
def test_resolve(name, model_dtype, device, quantized, tp, expected):
    assert resolve_kv_cache_dtype(name, model_dtype, device, quantized, tp) == expected


@pytest.mark.parametrize("name, device, tp, message", [
    ("fp8", CPU, False, "not accepted: one of auto, float32, float16, bfloat16"),
    ("float16", CUDA, False, "differs from the model's bfloat16"),
    ("float32", CPU, True, "without tensor parallelism"),
])
def test_refused(name, device, tp, message):
    with pytest.raises(ValueError, match=message):
        resolve_kv_cache_dtype(name, torch.bfloat16, device, False, tp)


def test_auto_is_fp16_for_quantized_weights_and_holds_twice_the_tokens(tiny_dir):
    folder = tiny_dir("llama-gqa-tied-bias")
    quantized = LLM(folder, device="cpu", kv_cache_gib=0.01, quantize="int4")
    plain = LLM(folder, device="cpu", kv_cache_gib=0.01)
    assert quantized.engine.runner.kv_caches[0][0].dtype == torch.float16
    assert plain.engine.runner.kv_caches[0][0].dtype == torch.float32
    assert quantized.engine.block_manager.num_blocks // 2 == plain.engine.block_manager.num_blocks  # (floors)


def score(folder, kv_cache_dtype: str) -> list[dict]:
    """Per prompt: greedy tokens with their log-probs, and its prompt log-probs computed 4 tokens a step (each
    chunk reads the earlier ones back from the cache)."""
    engine = LLM(folder, device="cpu", kv_cache_gib=0.01, max_num_batched_tokens=4,
                 kv_cache_dtype=kv_cache_dtype).engine
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, return_token_log_probs=True,
                            prompt_log_probs=True)
    results = [{"tokens": [], "log_probs": [], "prompt": None} for _ in PROMPTS]
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, params, request_id=str(i))
    while engine.has_unfinished():
        for out in engine.step():
            result = results[int(out.request_id)]
            result["tokens"] += out.token_ids
            result["log_probs"] += out.log_probs
            result["prompt"] = result["prompt"] or out.prompt_log_probs
    assert engine.block_manager.num_used == 0
    return results


@pytest.mark.parametrize("variant", ["llama-gqa-tied-bias", "falcon-40b-like"])
def test_fp16_cache_moves_log_probs_by_its_rounding_only(tiny_dir, variant):
    """fp16 keeps 11 significant bits (relative rounding <= 2^-11 per K/V element): on these tiny models the
    log-probs moved by 4e-6 (Llama) and 2e-5 (Falcon) when this was written; 1e-3 is allowed. Greedy tokens are
    compared up to the first near-tie, if any."""
    folder = tiny_dir(variant)
    exact, rounded = score(folder, "float32"), score(folder, "float16")
    compared = 0
    for a, b in zip(exact, rounded):
        torch.testing.assert_close(torch.tensor(b["prompt"][1:]), torch.tensor(a["prompt"][1:]), rtol=0, atol=1e-3)
        for token_a, token_b, lp_a, lp_b in zip(a["tokens"], b["tokens"], a["log_probs"], b["log_probs"]):
            if token_a != token_b:
                break
            assert abs(lp_a - lp_b) < 1e-3
            compared += 1
    assert compared >= 12  # at least one whole sequence before any near-tie
