"""logprobs, echo and top_logprobs on the OpenAI routes, through the `openai` client, against the default model
(the `llm_server` fixture: these tests are marked slow)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch

from llmengine_runtime.models.attention import AttentionMetadata
from tests.server.live_server import MODEL

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def direct_log_softmax(server, ids: list[int]) -> torch.Tensor:
    """The model's log-softmax at every position of `ids`, one cache-less forward through models/ directly."""
    model = server.engine.engine.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_prompts([len(ids)]))
        return torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)


def test_echo_with_logprobs_scores_the_prompt(llm_server):
    tokenizer = llm_server.engine.tokenizer
    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    r = client_for(llm_server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                                  logprobs=5, echo=True)
    [choice] = r.choices
    lp = choice.logprobs
    n = len(ids) + 4
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.tokens[:len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(n)]
    direct = direct_log_softmax(llm_server, ids)
    want = [float(direct[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=2e-4)
    for i in range(1, n):
        top = lp.top_logprobs[i]
        assert isinstance(top, dict) and 5 <= len(top) <= 6  # the chosen token is always among them
        assert top[lp.tokens[i]] == pytest.approx(lp.token_logprobs[i], abs=1e-5)
    for i in range(1, len(ids)):  # the prompt's top-5 are the model's own
        values, top_ids = direct[i - 1].topk(5)
        expected = {tokenizer.decode([t]): v for t, v in zip(top_ids.tolist(), values.tolist())}
        assert {k: v for k, v in lp.top_logprobs[i].items() if k in expected} == pytest.approx(expected, abs=2e-4)
    for i in range(len(ids), n):  # greedy completion: each chosen token is its row's most likely
        assert max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i], abs=1e-5)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 4


def test_echo_max_tokens_zero_scores_without_generating(llm_server):
    tokenizer = llm_server.engine.tokenizer
    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    client = client_for(llm_server)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, logprobs=1, echo=True)
    [choice] = r.choices
    assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    direct = direct_log_softmax(llm_server, ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [float(direct[i - 1, ids[i]]) for i in range(1, len(ids))], abs=2e-4)
    assert math.fsum(choice.logprobs.token_logprobs[1:]) < 0
    # streamed: the same numbers
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=0, logprobs=1, echo=True,
                                            stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == choice.logprobs.token_logprobs
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    # max_tokens 0 without echo, and logprobs past 20, are refused by name
    with pytest.raises(openai.BadRequestError, match="max_tokens=0"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="logprobs=21"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, logprobs=21)
    # echo without logprobs: the text only
    plain = httpx.post(llm_server.url + "/v2/completions",
                       json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0, "echo": True}, timeout=60).json()
    assert plain["choices"][0]["text"] == PROMPT and plain["choices"][0]["logprobs"] is None


def test_chat_top_logprobs(llm_server):
    client = client_for(llm_server)
    messages = [{"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert all(t.bytes == list(t.token.encode()) for t in entry.top_logprobs)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [[t.token for t in e.top_logprobs]
                                                                     for e in content]
