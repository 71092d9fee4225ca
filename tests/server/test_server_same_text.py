"""Same request, same text, through the server as `make run` serves the default model (its GGUF's int4 weights,
prefix caching on): the issue's three identical greedy completions one after another (the later ones hit the
prefix cache), and chat answered whole or streamed, several times over."""

from __future__ import annotations

import json

import httpx
import pytest
from live_server import MODEL

pytestmark = pytest.mark.slow

QUESTION = "Name the primary colours, one per line."


def streamed_text(url: str, body: dict) -> str:
    text = []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(text)


def test_three_identical_greedy_completions(llm_server):
    engine = llm_server.engine.engine
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0}
    hits = engine.block_manager.stats()["prefix_cache_hits"]
    texts = [httpx.post(llm_server.url + "/v1/completions", json=body, timeout=300).json()["choices"][0]["text"]
             for _ in range(3)]
    assert texts[0] and texts == [texts[0]] * 3
    assert engine.block_manager.stats()["prefix_cache_hits"] > hits  # the later ones came from the cache


def test_chat_whole_and_streamed_give_the_same_text(llm_server):
    url = llm_server.url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40, "temperature": 0}
    whole = [httpx.post(url, json=body, timeout=300).json()["choices"][0]["message"]["content"] for _ in range(2)]
    streamed = [streamed_text(url, body) for _ in range(2)]
    assert whole[0] and whole + streamed == [whole[0]] * 4
