"""The synchronous engine (through LLM.generate): batching, chunked prefill and preemption change nothing."""

from __future__ import annotations

import random

import pytest

from llmengine_runtime.runtime import LLM, SamplingParams
from tests.fast import fast_subset
from tests.reference_generate import generate

PROMPTS = [
    "Hi", "Suggest a name for an icecream shop", "The capital of France is", "1, 2, 3, 4,",
    "Write a haiku about the sea.", "def fibonacci(n):", "Once upon a time, in a land far, far away, there lived a",
    "Q: What is the boiling point of water?\nA:", "Translate to French: good morning", "The quick brown fox",
    "List three colors:", "import numpy as np\nx = np.", "Dear Sir or Madam, I am writing to complain about the "
    "service I received at your restaurant last Tuesday evening, when my family and I", "Why is the sky blue?",
    "A", "In 1492, Columbus sailed",
]


def test_default_model_known_greedy_answer(default_llm):
    out = default_llm.generate(["Suggest a name for an icecream shop"], SamplingParams(max_new_tokens=16),
                               progress=False)[0]
    # transformers' greedy fp32 continuation (docs/architecture.md), then eos
    assert out.text == " that's both unique and accessible to a wide range of customers."
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2 and out.num_completion_tokens == 14


def test_default_model_batch_of_16_equals_solo_runs(default_llm):
    params = SamplingParams(max_new_tokens=8)
    batch = default_llm.generate(PROMPTS, params, progress=False)
    for prompt, out in zip(PROMPTS, batch):
        solo = default_llm.generate([prompt], params, progress=False)[0]
        assert (out.token_ids, out.text, out.finish_reason) == (solo.token_ids, solo.text, solo.finish_reason), prompt
    assert len({len(default_llm.tokenizer.encode(p)) for p in PROMPTS}) > 8, "prompt lengths must be mixed"
    engine = default_llm.engine
    assert engine.block_manager.num_used == 0
    engine.block_manager.check([])


def test_chunked_prefill_equals_one_shot(default_llm):
    prompt = " ".join(PROMPTS)  # ~130 tokens
    params = SamplingParams(max_new_tokens=6, return_token_log_probs=True)
    scheduler = default_llm.engine.scheduler
    one_shot = default_llm.generate([prompt], params, progress=False)[0]
    steps_before = default_llm.engine.counters["steps"]
    scheduler.max_num_batched_tokens = 16
    try:
        chunked = default_llm.generate([prompt], params, progress=False)[0]
    finally:
        scheduler.max_num_batched_tokens = 512
    assert default_llm.engine.counters["steps"] - steps_before >= one_shot.num_prompt_tokens // 16 + 5
    assert chunked.token_ids == one_shot.token_ids
    assert chunked.log_probs == pytest.approx(one_shot.log_probs, abs=1e-4)


def test_seeded_sampling_reproducible_and_seeds_differ(default_llm):
    def run(seed, *others):
        params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed)] + \
            [SamplingParams(max_new_tokens=8, temperature=1.0) for _ in others]
        return default_llm.generate(["Tell me a story", *others], params, progress=False)[0].text

    first = run(1234)
    assert run(1234, "other", "requests in the batch") == first
    assert run(4321) != first


def test_top_k_1_equals_greedy(default_llm):
    greedy = default_llm.generate(PROMPTS[:3], SamplingParams(max_new_tokens=6), progress=False)
    top1 = default_llm.generate(PROMPTS[:3], SamplingParams(max_new_tokens=6, temperature=0.7, top_k=1),
                                progress=False)
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]


def test_stop_sequence_spanning_tokens_end_to_end(default_llm):
    full = default_llm.generate(["Suggest a name for an icecream shop"], SamplingParams(max_new_tokens=16),
                                progress=False)[0].text
    stop = "unique and acc"  # crosses token boundaries: " unique", " and", " accessible"
    for include, want in ((False, " that's both "), (True, " that's both unique and acc")):
        out = default_llm.generate(["Suggest a name for an icecream shop"],
                                   SamplingParams(max_new_tokens=16, stop_sequences=[stop],
                                                  include_stop_str_in_output=include), progress=False)[0]
        assert full.startswith(want) and out.text == want and out.finish_reason == "stop"


def test_rejects_requests_that_cannot_fit(default_llm, tiny_dir, cache_gib):
    with pytest.raises(ValueError, match=r"prompt \(\d+ tokens\) \+ max_new_tokens \(100000\) = \d+ tokens"):
        default_llm.generate(["Hello"], SamplingParams(max_new_tokens=100000), progress=False)
    with pytest.raises(ValueError, match="empty"):
        default_llm.generate([[]], progress=False)
    with pytest.raises(ValueError, match="temperature"):
        default_llm.generate(["Hello"], SamplingParams(temperature=-1), progress=False)
    folder = tiny_dir("llama-mha")
    llm = LLM(folder, block_size=4, kv_cache_gib=cache_gib(folder, 10, 4))  # 40 tokens of cache
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_new_tokens \(11\) = 41 tokens, "
                                         r"but the KV cache holds 40 tokens"):
        llm.generate([[5] * 30], SamplingParams(max_new_tokens=11), progress=False)
    assert llm.generate([[5] * 30], SamplingParams(max_new_tokens=10, ignore_eos=True),
                        progress=False)[0].num_completion_tokens == 10
    with pytest.raises(ValueError, match="has no tokenizer"):
        llm.generate(["text"], progress=False)
    assert llm.engine.requests == {} and llm.engine.block_manager.num_used == 0


def random_prompts(n: int, seed: int, low: int = 1, high: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 128) for _ in range(rng.randint(low, high))] for _ in range(n)]


@pytest.mark.parametrize("variant", fast_subset(["llama-gqa-tied-bias", "falcon-7b-like", "falcon-rw-like"],
                                                 ["falcon-7b-like"]))
def test_tiny_models_batch_of_16_equals_solo_and_reference(tiny_dir, variant):
    llm = LLM(tiny_dir(variant), block_size=4, kv_cache_gib=0.01, max_num_batched_tokens=64)
    prompts = random_prompts(16, seed=1)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batch = llm.generate(prompts, params, progress=False)
    for prompt, out in zip(prompts, batch):
        solo = llm.generate([prompt], params, progress=False)[0]
        reference = generate(llm.engine.model, [prompt], 12)[0]  # the reference loop of tests/reference_generate.py
        assert out.token_ids == solo.token_ids == reference
        assert out.text == "" and out.finish_reason == "length"
    assert llm.engine.block_manager.num_used == 0


@pytest.mark.slow
def test_preemption_when_the_cache_is_too_small(tiny_dir, cache_gib):
    folder = tiny_dir("llama-mha")
    # 24 blocks of 4 = 96 tokens for 32 requests of up to 30 + 16 tokens each
    llm = LLM(folder, block_size=4, kv_cache_gib=cache_gib(folder, 24, 4), max_num_seqs=32)
    assert llm.engine.block_manager.num_blocks == 24
    prompts = random_prompts(32, seed=2, low=5, high=30)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    batch = llm.generate(prompts, params, progress=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.stats()["num_preemptions"] == llm.engine.scheduler.num_preemptions
    for prompt, out in zip(prompts, batch):
        assert out.finish_reason == "length" and len(out.token_ids) == 16
        assert out.token_ids == generate(llm.engine.model, [prompt], 16)[0]
    assert llm.engine.block_manager.num_used == 0
    llm.engine.block_manager.check([])
