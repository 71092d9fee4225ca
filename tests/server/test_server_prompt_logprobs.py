"""vLLM's `prompt_logprobs` on the OpenAI routes: per prompt token (the first null) its log-prob, rank and
decoded text, with the N most likely tokens (ranks 1..N); on completions per choice, on chat at the top level. The
refusals on a fake engine (fast), the numbers on the real default model against its own forward and against what
echo with logprobs gives (slow: the `llm_server` fixture)."""

from __future__ import annotations

import httpx
import pytest
import torch
from fake_engine import FakeEngine
from live_server import MODEL, serve

from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.server.app import create_app

PROMPT = "The capital of France is Paris, and the capital of Italy is"
TOL = 2e-4  # the served (cached, batched) forward against one cache-less forward
ROUTES = {"/v1/completions": {"prompt": "a b", "max_tokens": 2},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine(chat_template="fake", delay=0.001)
    with serve(create_app({"fake": engine})) as live:
        live.engine = engine
        yield live


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("extra", [{"prompt_logprobs": -1}, {"prompt_logprobs": 21}, {"prompt_logprobs": "2"},
                                   {"prompt_logprobs": 1.5}, {"prompt_logprobs": True},
                                   {"prompt_logprobs": 21, "stream": True}])
def test_bad_prompt_logprobs_are_400s_naming_the_field(fake, path, extra):
    before = len(fake.engine.requests)
    r = httpx.post(fake.url + path, json={**ROUTES[path], **extra}, timeout=10)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "prompt_logprobs" in message and len(fake.engine.requests) == before
    if extra["prompt_logprobs"] in (-1, 21):
        assert "0 to 20" in message


@pytest.mark.parametrize("path", list(ROUTES))
def test_prompt_logprobs_reach_the_engine(fake, path):
    r = httpx.post(fake.url + path, json={**ROUTES[path], "prompt_logprobs": 3, "max_tokens": 0
                                          if path == "/v1/completions" else 2}, timeout=10)
    assert r.status_code == 200, r.text
    params = fake.engine.requests[-1][1]
    assert params.prompt_log_probs and params.prompt_top_log_probs == 3 and params.top_log_probs == 0


def direct_log_softmax(server, ids: list[int]) -> torch.Tensor:
    model = server.engine.engine.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_prompts([len(ids)]))
        return torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)


def check_entries(entries: list, ids: list[int], n: int, tokenizer, direct: torch.Tensor) -> None:
    """One entry per prompt token, the first null; each holds the token (its rank right) and the top-n."""
    assert len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        entry, row = entries[i], direct[i - 1]
        own = entry[str(ids[i])]
        assert own["decoded_token"] == tokenizer.decode([ids[i]], skip_special_tokens=False)
        assert own["logprob"] == pytest.approx(float(row[ids[i]]), abs=TOL)
        low, high = 1 + int((row > own["logprob"] + TOL).sum()), 1 + int((row > own["logprob"] - TOL).sum())
        assert low <= own["rank"] <= high, (i, own, low, high)
        top = sorted(((v["rank"], int(k), v["logprob"]) for k, v in entry.items() if v["rank"] <= n))
        if n:
            values, top_ids = row.topk(n)
            assert [r for r, _, _ in top] == list(range(1, n + 1))
            assert {t for _, t, _ in top} == set(top_ids.tolist())
            assert [v for _, _, v in top] == pytest.approx(values.tolist(), abs=TOL)
        assert len(entry) == n + (ids[i] not in {t for _, t, _ in top})


def test_completions_prompt_logprobs_on_the_default_model(llm_server):
    tokenizer = llm_server.engine.tokenizer
    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    direct = direct_log_softmax(llm_server, ids)
    url = llm_server.url + "/v1/completions"
    r = httpx.post(url, json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "n": 2,
                              "prompt_logprobs": 2}, timeout=120)
    assert r.status_code == 200, r.text
    first, second = r.json()["choices"]
    check_entries(first["prompt_logprobs"], ids, 2, tokenizer, direct)
    assert second["prompt_logprobs"] == first["prompt_logprobs"]  # each choice has its prompt's
    assert first["logprobs"] is None and first["text"] == second["text"] != ""
    echo = httpx.post(url, json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1},
                      timeout=120).json()["choices"][0]["logprobs"]
    assert [entry[str(t)]["logprob"] for entry, t in zip(first["prompt_logprobs"][1:], ids[1:])] \
        == pytest.approx(echo["token_logprobs"][1:len(ids)], abs=1e-4)
    # N 0 and max_tokens 0: the prompt's own tokens only, nothing generated; with echo and logprobs in the same
    # request each answer keeps its own N
    score = httpx.post(url, json={"model": MODEL, "prompt": ids, "max_tokens": 0, "prompt_logprobs": 0},
                       timeout=120).json()
    check_entries(score["choices"][0]["prompt_logprobs"], ids, 0, tokenizer, direct)
    assert score["choices"][0]["text"] == "" and score["usage"]["completion_tokens"] == 0
    both = httpx.post(url, json={"model": MODEL, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                                 "prompt_logprobs": 3}, timeout=120).json()["choices"][0]
    check_entries(both["prompt_logprobs"], ids, 3, tokenizer, direct)
    assert all(len(top) <= 2 for top in both["logprobs"]["top_logprobs"][1:])


def test_chat_prompt_logprobs_at_the_top_level(llm_server):
    tokenizer = llm_server.engine.tokenizer
    messages = [{"role": "user", "content": "Name a color."}]
    r = httpx.post(llm_server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0,
                         "prompt_logprobs": 1, "return_token_ids": True}, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    ids = answer["prompt_token_ids"]  # the templated prompt
    assert len(ids) == answer["usage"]["prompt_tokens"]
    check_entries(answer["prompt_logprobs"], ids, 1, tokenizer, direct_log_softmax(llm_server, ids))
    assert "prompt_logprobs" not in answer["choices"][0]
