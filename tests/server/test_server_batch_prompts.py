"""Batches of prompts on /v1/completions: a list of strings or of token-id lists, answered in vLLM's order (choice
i * n + j is sample j of prompt i), streamed or not, admitted together (so they batch), and failed whole, with a 400
naming the prompt's index, when one prompt cannot be served. Fake-engine tests first (fast), the real model after."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from live_server import MODEL, serve, wait_for

from llmengine_runtime.server.app import create_app


def idle(engine) -> bool:
    stats = engine.stats()
    return stats["blocks_used"] == 0 and stats["num_running"] == 0


@pytest.fixture
def fake():
    engine = FakeEngine()
    with serve(create_app({"fake": engine})) as live:
        live.engine = engine
        live.client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=10)
        yield live


def test_a_list_of_prompts_answers_each_in_vllm_order(fake):
    r = fake.client.completions.create(model="fake", prompt=["a b", "c d e"], max_tokens=2, n=2, echo=True,
                                       seed=5, extra_headers={"X-Request-Id": "batch"})
    assert [(c.index, c.text) for c in r.choices] == [(0, "a b w0 w1"), (1, "a b w0 w1"),
                                                      (2, "c d e w0 w1"), (3, "c d e w0 w1")]
    engine = fake.engine
    assert [p for p, _ in engine.requests[-4:]] == ["a b", "a b", "c d e", "c d e"]
    assert engine.request_ids[-4:] == ["batch-0", "batch-1", "batch-2", "batch-3"]
    assert [p.seed for _, p in engine.requests[-4:]] == [5, 6, 5, 6]  # sample j of every prompt: seed + j
    assert r.usage.prompt_tokens == 2 + 3 and r.usage.completion_tokens == 8  # each prompt counted once


def test_token_id_prompts_and_a_stream_keep_the_indices(fake):
    tokens = fake.engine.tokenizer.encode("x y z")
    body = {"model": "fake", "prompt": [tokens[:1], tokens], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(fake.url + "/v1/completions", json=body)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: " w0 w1 w2", 1: " w0 w1 w2"}
    assert chunks[-1]["usage"]["prompt_tokens"] == 1 + 3 and chunks[-1]["usage"]["completion_tokens"] == 6
    assert [p for p, _ in fake.engine.requests[-2:]] == [tokens[:1], tokens]


@pytest.mark.parametrize("prompt, problem", [(["a", "b " * 70], "prompt[1]"), (["a", ""], "prompt[1]"),
                                             ([[1], []], "prompt[1] is empty")])
def test_a_bad_prompt_fails_the_whole_request_naming_its_index(fake, prompt, problem):
    engine = fake.engine
    before = len(engine.requests)
    r = httpx.post(fake.url + "/v1/completions", json={"model": "fake", "prompt": prompt, "max_tokens": 2, "n": 2})
    assert r.status_code == 400 and problem in r.json()["error"]["message"]
    admitted = engine.request_ids[before:]
    assert sorted(engine.aborts[-len(admitted):] if admitted else []) == sorted(admitted)  # none left running
    assert wait_for(lambda: idle(engine)) and not fake.state.jobs


def test_too_many_prompts_is_a_400(fake):
    r = httpx.post(fake.url + "/v1/completions", json={"model": "fake", "prompt": ["a"] * 257, "max_tokens": 1})
    assert r.status_code == 400 and "at most 256" in r.json()["error"]["message"]


# ---- the real default model (slow) ------------------------------------------------------------------------------
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Suggest a name for an icecream shop", "def fibonacci(n):"]


def test_real_batch_equals_one_by_one_and_runs_as_a_batch(llm_server):
    client = openai.OpenAI(base_url=llm_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    engine = llm_server.engine
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, logprobs=1).choices[0]
             for p in PROMPTS]
    steps = engine.stats()["steps"]
    batch = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8, temperature=0, logprobs=1)
    assert engine.stats()["steps"] - steps <= 12  # one at a time would take at least 4 x 8 steps
    assert [c.text for c in batch.choices] == [c.text for c in alone]
    for b, a in zip(batch.choices, alone):
        assert b.logprobs.token_logprobs == pytest.approx(a.logprobs.token_logprobs, abs=1e-4)
    # lm-evaluation-harness's loglikelihood requests: token ids, echo, logprobs, max_tokens 0
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, temperature=0, echo=True, logprobs=0)
    for i, choice in enumerate(scored.choices):
        one = client.completions.create(model=MODEL, prompt=ids[i], max_tokens=0, temperature=0, echo=True,
                                        logprobs=0).choices[0]
        assert choice.index == i and choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(one.logprobs.token_logprobs[1:], abs=1e-4)
    assert wait_for(lambda: engine.stats()["num_running"] == 0, timeout=5)
