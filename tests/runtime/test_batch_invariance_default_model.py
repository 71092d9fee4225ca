"""Same request, same text, on the default model as `make run` serves it (its GGUF's int4 weights, prefix caching
on): identical greedy requests one after the other (the later ones hit the prefix cache), the same prompts alone and
together, and n-gram speculation against plain decoding, all equal to the bit (tokens and log-probs)."""

from __future__ import annotations

import pytest

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.engine import Engine
from tests.runtime.spec_helpers import run

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Name the primary colours, one per line.", "What is the capital of France?", "Write a haiku about rain.",
    "List three prime numbers.", "Summarise: The cat sat on the mat. The cat was happy on the mat.",
    "Translate 'good morning' to Spanish.", "Give two synonyms for 'fast'.", "Count from one to ten in words.",
    "Explain what a noun is in one sentence.", "Repeat after me: red, green, blue, red, green, blue.",
    "What colour is the sky on a clear day?", "Name a fruit that is yellow.", "Fix the typo: 'teh quick fox'.",
    "Write the alphabet's first five letters.", "Say hello in French, German and Italian.",
    "Edit for grammar: 'She go to school every days.'",
]
PARAMS = SamplingParams(max_new_tokens=40, return_token_log_probs=True)


def chat(engine: Engine, question: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])


@pytest.fixture(scope="module")
def served(default_model_dir) -> Engine:
    return Engine(default_model_dir, device="cpu", quantize="auto", kv_cache_gib=0.25, enable_prefix_caching=True)


def numbers(results) -> list:
    return [(r.text, r.token_ids, r.log_probs) for r in results]


def test_identical_requests_one_after_another(served):
    prompt = chat(served, QUESTIONS[0])
    first, second, third = (run(served, [prompt], PARAMS)[0] for _ in range(3))
    assert numbers([second, third]) == numbers([first, first])
    assert served.block_manager.stats()["prefix_cache_hits"] > 0


def test_alone_together_and_speculated(served, default_model_dir):
    prompts = [chat(served, q) for q in QUESTIONS]
    alone = [run(served, [p], PARAMS)[0] for p in prompts]
    assert numbers(run(served, prompts[::-1], PARAMS)[::-1]) == numbers(alone)
    spec = Engine(default_model_dir, device="cpu", quantize="auto", kv_cache_gib=0.25, enable_prefix_caching=False,
                  speculative="ngram")
    assert numbers(run(spec, prompts, PARAMS)) == numbers(alone)
    assert spec.counters["spec_accepted_tokens"] > 0
