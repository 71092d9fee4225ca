"""vLLM's `prompt_logprobs` with `stream: true` (an extension: vLLM refuses N > 0 with a stream and drops N = 0).
Each choice's first chunk carries its prompt's entries, exactly the non-streamed answer's for that choice: on
completions in the choice object (beside `prompt_token_ids`), on chat at the chunk's top level. Checked with n > 1
and lists of prompts, on a fake engine that scores prompts by their words (fast: a mixed-up choice or prompt shows)
and whose first delta has no text (the scores must wait for the first chunk sent), and on the default model
(streamed == non-streamed, exact)."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from fake_engine import FakeEngine
from live_server import MODEL, serve

from llmengine_runtime.server.app import create_app


def events(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def fake_scores(ids: list[int], top_n: int) -> tuple[list, list, list]:
    """Log-probs, ranks and top-N of a prompt, from its token ids and positions (the first token unscored)."""
    lps = [None] + [-(0.37 * t + 0.011 * k) for k, t in enumerate(ids) if k]
    ranks = [None] + [1 + t % 5 for k, t in enumerate(ids) if k]
    tops = [None] + [[(ids[k - 1], -0.05 * j - 0.01 * k) for j in range(top_n)][:1] for k in range(1, len(ids))]
    return lps, ranks, tops


class ScoringEngine(FakeEngine):
    """FakeEngine whose first output of a request with prompt_log_probs carries the prompt's scores, as the real
    engine's does (each choice is its own engine request, so each choice's first output has them)."""

    def add_request(self, prompt, params, request_id=None, deadline=None, stream=True):
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        return self._scored(super().add_request(prompt, params, request_id, deadline, stream), ids, params)

    async def _scored(self, outputs, ids, params):
        first = True
        async for out in outputs:
            if first and params.prompt_log_probs:
                lps, ranks, tops = fake_scores(ids, max(params.prompt_top_log_probs, 0))
                out = dataclasses.replace(out, prompt_log_probs=lps, prompt_ranks=ranks, prompt_token_ids=ids,
                                          prompt_top_log_probs=tops if params.prompt_top_log_probs > 0 else None)
            first = False
            yield out


@pytest.fixture(scope="module")
def fake():
    engine = ScoringEngine(chat_template="fake", delay=0.001)
    with serve(create_app({"fake": engine})) as live:
        live.engine = engine
        yield live


def first_chunks(chunks: list[dict], where) -> dict[int, dict]:
    """Each choice index's first chunk; and no later chunk of it carries prompt_logprobs."""
    seen: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            i = choice["index"]
            if i in seen:
                assert "prompt_logprobs" not in where(chunk, choice), (i, chunk)
            else:
                seen[i] = where(chunk, choice)
    return seen


# "quiet" prompts: the fake's first delta (the one with the scores) has no text, so no chunk is sent for it
COMPLETION = {"prompt": ["quiet alpha beta gamma", "quiet delta alpha epsilon zeta"], "n": 2, "max_tokens": 4,
              "prompt_logprobs": 1}


@pytest.mark.parametrize("extra", [{}, {"return_token_ids": True}, {"logprobs": 1, "echo": True}])
def test_completions_stream_carries_each_choices_prompt_logprobs(fake, extra):
    url = fake.url + "/v1/completions"
    whole = httpx.post(url, json={**COMPLETION, **extra}, timeout=10).json()["choices"]
    first = first_chunks(events(httpx.post(url, json={**COMPLETION, **extra, "stream": True}, timeout=10)),
                         lambda chunk, choice: choice)
    assert sorted(first) == [0, 1, 2, 3] and [c["index"] for c in whole] == [0, 1, 2, 3]
    for i in range(4):
        assert first[i]["prompt_logprobs"] == whole[i]["prompt_logprobs"], i
        if not extra:  # the first chunk sent is the second delta's: the fake's first has no text
            assert first[i]["text"] == " w1"
    # each choice has its own prompt's scores: prompt i // n, token by token
    for i, prompt in enumerate(COMPLETION["prompt"]):
        ids = fake.engine.tokenizer.encode(prompt)
        lps, ranks, _ = fake_scores(ids, 1)
        for choice in (whole[2 * i], whole[2 * i + 1]):
            entries = choice["prompt_logprobs"]
            assert entries[0] is None and len(entries) == len(ids)
            assert [e[str(t)]["logprob"] for e, t in zip(entries[1:], ids[1:])] == lps[1:]
            assert [e[str(t)]["rank"] for e, t in zip(entries[1:], ids[1:])] == ranks[1:]
    assert whole[0]["prompt_logprobs"] != whole[2]["prompt_logprobs"]
    if extra.get("return_token_ids"):
        assert all(first[i]["prompt_token_ids"] == whole[i]["prompt_token_ids"] for i in range(4))


def test_completions_stream_scores_without_generating(fake):
    body = {"prompt": "alpha beta", "max_tokens": 0, "prompt_logprobs": 0}
    url = fake.url + "/v1/completions"
    whole = httpx.post(url, json=body, timeout=10).json()["choices"][0]
    first = first_chunks(events(httpx.post(url, json={**body, "stream": True}, timeout=10)),
                         lambda chunk, choice: choice)
    assert first[0]["prompt_logprobs"] == whole["prompt_logprobs"] is not None


CHAT = {"messages": [{"role": "user", "content": "alpha beta gamma"}], "n": 2, "max_tokens": 3, "prompt_logprobs": 2}


@pytest.mark.parametrize("extra", [{}, {"return_token_ids": True}])
def test_chat_stream_carries_prompt_logprobs_at_the_top_level(fake, extra):
    url = fake.url + "/v1/chat/completions"
    whole = httpx.post(url, json={**CHAT, **extra}, timeout=10).json()
    first = first_chunks(events(httpx.post(url, json={**CHAT, **extra, "stream": True}, timeout=10)),
                         lambda chunk, choice: chunk)
    assert sorted(first) == [0, 1] and whole["prompt_logprobs"] is not None
    for i in (0, 1):
        assert first[i]["prompt_logprobs"] == whole["prompt_logprobs"], i
        assert first[i]["choices"][0]["delta"]["role"] == "assistant"
        if extra:
            assert first[i]["prompt_token_ids"] == whole["prompt_token_ids"]
    ids = whole.get("prompt_token_ids") or fake.engine.requests[-1][0]
    assert [e[str(t)]["logprob"] for e, t in zip(whole["prompt_logprobs"][1:], ids[1:])] == fake_scores(ids, 2)[0][1:]


def test_stream_without_prompt_logprobs_has_no_such_key(fake):
    chunks = events(httpx.post(fake.url + "/v1/completions", json={**COMPLETION, "prompt_logprobs": None,
                                                                   "stream": True}, timeout=10))
    assert chunks and all("prompt_logprobs" not in c and "prompt_logprobs" not in ch
                          for c in chunks for ch in c["choices"])


def test_default_model_streamed_prompt_logprobs_equal_non_streamed(llm_server):
    """The real runtime: every choice's streamed entries == the non-streamed ones, exactly (values, ranks,
    top-N), for a list of prompts with n = 2 and for chat."""
    url = llm_server.url
    body = {"model": MODEL, "prompt": ["The capital of France is", "One, two, three, four,"], "n": 2,
            "max_tokens": 3, "temperature": 0, "prompt_logprobs": 3}
    whole = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"]
    first = first_chunks(events(httpx.post(url + "/v1/completions", json={**body, "stream": True}, timeout=120)),
                         lambda chunk, choice: choice)
    assert len(whole) == 4 and sorted(first) == [0, 1, 2, 3]
    for i in range(4):
        assert first[i]["prompt_logprobs"] == whole[i]["prompt_logprobs"] and whole[i]["prompt_logprobs"], i
    assert whole[0]["prompt_logprobs"] != whole[2]["prompt_logprobs"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a color."}], "n": 2, "max_tokens": 3,
            "temperature": 0, "prompt_logprobs": 2}
    answer = httpx.post(url + "/v1/chat/completions", json=chat, timeout=120).json()
    chunks = first_chunks(events(httpx.post(url + "/v1/chat/completions", json={**chat, "stream": True},
                                            timeout=120)), lambda chunk, choice: chunk)
    assert [chunks[i]["prompt_logprobs"] for i in (0, 1)] == [answer["prompt_logprobs"]] * 2
    assert answer["prompt_logprobs"][0] is None and len(answer["prompt_logprobs"]) == answer["usage"]["prompt_tokens"]
