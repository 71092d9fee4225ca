"""vLLM's routes beside ours (/tokenize, /detokenize, /health, /ping, /version) and its `vllm:`-named metrics, on a
fake engine; /tokenize against the real tokenizer and chat template at the end (slow)."""

from __future__ import annotations

import re

import httpx
import pytest
from fake_engine import FakeEngine
from live_server import MODEL, serve

from llmengine_runtime.server.app import create_app

KEY = {"x-api-key": "k"}


@pytest.fixture
def live():
    engine = FakeEngine(chat_template="fake")
    with serve(create_app({"fake": engine}, api_key="k")) as server:
        server.engine = engine
        yield server


def test_tokenize_prompt_and_messages_and_detokenize(live):
    r = httpx.post(live.url + "/tokenize", json={"prompt": "a b a", "return_token_strs": True}, headers=KEY)
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == live.engine.tokenizer.encode("a b a") and body["count"] == 3
    assert body["token_strs"] == ["a", "b", "a"] and body["max_model_len"] == 64
    chat = httpx.post(live.url + "/tokenize", headers=KEY, json={
        "model": "fake", "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}).json()
    assert live.engine.tokenizer.decode(chat["tokens"]) == "hi <|user|>" and chat["token_strs"] is None
    back = httpx.post(live.url + "/detokenize", json={"tokens": body["tokens"]}, headers=KEY)
    assert back.status_code == 200 and back.json() == {"prompt": "a b a"}


@pytest.mark.parametrize("path, body, field", [
    ("/tokenize", {"prompt": "a", "add_special_token": True}, "add_special_token"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}, "chat_template"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/detokenize", {"tokens": ["a"]}, "tokens"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, "nope"),
])
def test_bad_bodies_are_400s_naming_the_field(live, path, body, field):
    r = httpx.post(live.url + path, json=body, headers=KEY)
    assert r.status_code in (400, 404) and field in r.json()["error"]["message"]


def test_health_ping_and_version_are_open_and_tokenize_is_not(live):
    health = httpx.get(live.url + "/health")
    assert health.status_code == 200 and health.content == b""
    assert httpx.get(live.url + "/ping").status_code == 200 and httpx.post(live.url + "/ping").status_code == 200
    version = httpx.get(live.url + "/version").json()["version"]
    assert re.match(r"\d+(\.\d+)*", version)
    assert httpx.post(live.url + "/tokenize", json={"prompt": "a"}).status_code == 401
    live.engine.failed = "worker 1 died"
    assert httpx.get(live.url + "/health").status_code == 503


def test_vllm_named_metrics(live):
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "a b c", "max_tokens": 4}, headers=KEY)
    assert r.status_code == 200
    text = httpx.get(live.url + "/metrics", headers=KEY).text
    label = '{model_name="fake"}'
    assert f"vllm:prompt_tokens_total{label} 3.0" in text and f"vllm:generation_tokens_total{label} 4.0" in text
    assert f"vllm:num_requests_running{label} 0.0" in text and f"vllm:num_requests_waiting{label} 0.0" in text
    assert f"vllm:kv_cache_usage_perc{label} 0.0" in text and f"vllm:gpu_cache_usage_perc{label} 0.0" in text
    assert f"vllm:time_to_first_token_seconds_count{label} 1.0" in text
    assert f"vllm:e2e_request_latency_seconds_count{label} 1.0" in text
    assert 'vllm:request_success_total{finished_reason="length",model_name="fake"} 1.0' in text


def test_real_tokenize_matches_the_tokenizer_and_the_chat_prompt(llm_server):
    tokenizer = llm_server.engine.tokenizer
    text = "Suggest a name for an icecream shop"
    r = httpx.post(llm_server.url + "/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r["tokens"] == tokenizer.encode(text)
    messages = [{"role": "user", "content": text}]
    chat = httpx.post(llm_server.url + "/tokenize", json={"messages": messages}).json()
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(templated, add_special_tokens=False)
    back = httpx.post(llm_server.url + "/detokenize", json={"tokens": chat["tokens"]}).json()
    assert back["prompt"] == templated
