"""vLLM's fields and outputs on the OpenAI routes, by their effect on the answer: the request id, `model` left out,
stop_reason, continuous usage stats, and on the real default model min_tokens (genai-perf's requests), stop_token_ids,
logit_bias, bad_words, return_token_ids, truncate_prompt_tokens, include_stop_str_in_output with
skip_special_tokens, and the prefix cache's cached_tokens. Fake-engine tests first (fast), the real model after."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from live_server import MODEL, serve, wait_for

from llmengine_runtime.server.app import create_app

SHOP = "Suggest a name for an icecream shop"  # greedy: " that's both unique and accessible ..." then eos (14 tokens)


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


@pytest.fixture
def fake():
    engine = FakeEngine(chat_template="fake")
    with serve(create_app({"fake": engine})) as live:
        live.engine = engine
        yield live


def test_x_request_id_names_the_request(fake):
    r = httpx.post(fake.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 2, "n": 2},
                   headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert fake.engine.request_ids[-2:] == ["trace-42-0", "trace-42-1"] and r.json()["id"] == "cmpl-trace-42"
    r = httpx.post(fake.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                   headers={"X-Request-Id": "has space"})
    assert r.status_code == 400 and "x-request-id" in r.json()["detail"]


def test_model_may_be_left_out_when_one_model_is_served(fake):
    r = httpx.post(fake.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "fake"
    with serve(create_app({"a": FakeEngine(name="a"), "b": FakeEngine(name="b")})) as two:
        r = httpx.post(two.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 2})
        assert r.status_code == 400 and "model is required" in r.json()["error"]["message"]


def test_models_list_names_root_and_parent(fake):
    [entry] = httpx.get(fake.url + "/v1/models").json()["data"]
    assert entry["id"] == "fake" and entry["root"] == "fake" and entry["parent"] is None


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "a b"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})])
def test_continuous_usage_stats_put_usage_in_every_chunk(fake, path, body):
    r = httpx.post(fake.url + path, json={**body, "max_tokens": 3, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    chunks = events(r.text)
    with_choices = [c for c in chunks if c["choices"]]
    counts = [c["usage"]["completion_tokens"] for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == 3 and all("usage" in c for c in with_choices)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    plain = httpx.post(fake.url + path, json={**body, "max_tokens": 3, "stream": True,
                                              "stream_options": {"include_usage": True}})
    assert all(c.get("usage") is None for c in events(plain.text)[:-1])


# ---- the real default model (slow) ------------------------------------------------------------------------------
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_genai_perf_min_tokens_equal_to_max_tokens_gives_exactly_that_many(llm_server):
    c = client(llm_server)
    extra = {"min_tokens": 24, "ignore_eos": False}
    plain = c.completions.create(model=MODEL, prompt=SHOP, max_tokens=24, temperature=0)
    assert plain.usage.completion_tokens == 14  # the model ends it early by itself
    done = c.completions.create(model=MODEL, prompt=SHOP, max_tokens=24, temperature=0, extra_body=extra)
    assert done.usage.completion_tokens == 24 and done.choices[0].finish_reason == "length"
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=40,
                                     extra_body={**extra, "min_tokens": 40}, stream=True,
                                     stream_options={"include_usage": True})
    assert list(chat)[-1].usage.completion_tokens == 40


def test_vllm_bench_serve_style_stream_gives_exactly_the_requested_length(llm_server):
    """`vllm bench serve`'s openai-completions payload (streamed, usage asked, best_of 1, ignore_eos false) with
    min_tokens = max_tokens through its extra body: every streamed token counted, the stream ends by length."""
    body = {"model": MODEL, "prompt": SHOP, "temperature": 0.0, "best_of": 1, "max_tokens": 24, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": False, "min_tokens": 24,
            "return_token_ids": True}
    r = httpx.post(llm_server.url + "/v1/completions", json=body, timeout=120)
    chunks = events(r.text)
    assert r.status_code == 200 and chunks[-1]["usage"]["completion_tokens"] == 24
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert sum(len(c["token_ids"]) for c in choices) == 24 and choices[-1]["finish_reason"] == "length"


def test_stop_token_ids_logit_bias_and_bad_words_change_the_answer(llm_server):
    c, tokenizer = client(llm_server), llm_server.engine.tokenizer
    unique = tokenizer.encode(" unique", add_special_tokens=False)[0]
    stopped = c.completions.create(model=MODEL, prompt=SHOP, max_tokens=16, temperature=0,
                                   extra_body={"stop_token_ids": [unique]})
    choice = stopped.model_dump()["choices"][0]
    assert choice["text"] == " that's both" and choice["finish_reason"] == "stop" and choice["stop_reason"] == unique
    by_string = c.completions.create(model=MODEL, prompt=SHOP, max_tokens=16, temperature=0, stop=["accessible"])
    assert by_string.model_dump()["choices"][0]["stop_reason"] == "accessible"
    biased = c.completions.create(model=MODEL, prompt=SHOP, max_tokens=8, temperature=0,
                                  logit_bias={str(unique): -100})
    banned = c.completions.create(model=MODEL, prompt=SHOP, max_tokens=8, temperature=0,
                                  extra_body={"bad_words": ["unique"]})
    for answer in (biased, banned):
        text = answer.choices[0].text
        assert text.startswith(" that's both") and "unique" not in text


def test_return_token_ids_truncation_and_special_tokens(llm_server):
    c, tokenizer = client(llm_server), llm_server.engine.tokenizer
    r = c.completions.create(model=MODEL, prompt=SHOP, max_tokens=16, temperature=0,
                             extra_body={"return_token_ids": True, "include_stop_str_in_output": True,
                                         "skip_special_tokens": False}).model_dump()
    choice = r["choices"][0]
    assert choice["prompt_token_ids"] == tokenizer.encode(SHOP)
    eos = tokenizer.decode([choice["token_ids"][-1]], skip_special_tokens=False)
    assert choice["token_ids"][-1] in llm_server.engine.engine.stop_token_ids and eos.startswith("<|")
    assert choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=False)
    assert choice["text"].endswith(eos)  # the stop token's text, kept and not skipped
    short = c.completions.create(model=MODEL, prompt=SHOP, max_tokens=2, temperature=0,
                                 extra_body={"truncate_prompt_tokens": 3, "return_token_ids": True}).model_dump()
    assert short["usage"]["prompt_tokens"] == 3
    assert short["choices"][0]["prompt_token_ids"] == tokenizer.encode(SHOP)[-3:]


def test_cached_tokens_come_from_the_prefix_cache(llm_server):
    c = client(llm_server)
    prompt = f"{uuid.uuid4().hex} " + "Tell me about the history of ice cream in Italy and France. " * 4
    first = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    second = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 32
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert wait_for(lambda: llm_server.engine.stats()["num_running"] == 0, timeout=5)
