"""Chat completions (/v1/chat/completions, /v2/chat/completions), `n` choices, /v2/completions, and OpenAI's error
object on the OpenAI-style routes, through the real `openai` client where it can be used. Fake-engine tests
first (fast); the real default model at the end (slow: the `llm_server` fixture)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from live_server import MODEL, serve, wait_for

from llmengine_runtime.server.app import create_app

USER = [{"role": "user", "content": "hello there"}]


def data_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def idle(engine) -> bool:
    stats = engine.stats()
    return stats["blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0


@pytest.fixture
def chat_server():
    engine = FakeEngine(chat_template="fake")
    with serve(create_app({"fake": engine, "plain": FakeEngine(name="plain")})) as live:
        live.engine = engine
        live.client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=10)
        yield live


def test_chat_applies_the_template_and_answers_in_openai_shape(chat_server):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": " you"}]}]
    r = chat_server.client.chat.completions.create(model="fake", messages=messages, max_tokens=3)
    assert r.object == "chat.completion" and r.model == "fake" and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content == " w0 w1 w2"
    assert choice.finish_reason == "length" and choice.logprobs is None
    prompt, params = chat_server.engine.requests[-1]
    tokenizer = chat_server.engine.tokenizer
    assert tokenizer.decode(prompt) == "be brief <|system|> hello you <|user|> <|assistant|>"
    assert tokenizer.special_tokens_added[-1] is False  # the template wrote the special tokens
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 3 and r.usage.total_tokens == 10
    assert params.max_new_tokens == 3 and params.temperature == 1.0


@pytest.mark.slow
def test_sampling_fields_reach_the_engine(chat_server):
    chat_server.client.chat.completions.create(
        model="fake", messages=USER, max_completion_tokens=4, max_tokens=9, temperature=0.5, top_p=0.9,
        stop="w9", seed=11, presence_penalty=0.5, frequency_penalty=-0.5)
    _, params = chat_server.engine.requests[-1]
    assert (params.max_new_tokens, params.temperature, params.top_p, params.stop_sequences, params.seed) == \
        (4, 0.5, 0.9, ["w9"], 11)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    chat_server.client.chat.completions.create(model="fake", messages=USER)  # no max_tokens: fill the context
    prompt, params = chat_server.engine.requests[-1]
    assert params.max_new_tokens == 64 - len(prompt)


def test_stream_chunks_usage_and_done(chat_server):
    stream = chat_server.client.chat.completions.create(model="fake", messages=USER, max_tokens=3, stream=True,
                                                        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == " w0 w1 w2"
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])

    r = httpx.post(chat_server.url + "/v2/chat/completions", json={
        "model": "fake", "messages": USER, "max_tokens": 2, "stream": True})
    events = data_events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]" and r.text.endswith("data: [DONE]\n\n")
    first, *_, last = [json.loads(e) for e in events[:-1]]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length",
                                  "stop_reason": None}
    assert "usage" not in last


def test_v2_chat_plain_matches_v1(chat_server):
    body = {"model": "fake", "messages": USER, "max_tokens": 2, "temperature": 0}
    v1 = httpx.post(chat_server.url + "/v1/chat/completions", json=body).json()
    v2 = httpx.post(chat_server.url + "/v2/chat/completions", json=body).json()
    for answer in (v1, v2):
        assert answer["choices"] == [{"index": 0, "message": {"role": "assistant", "content": " w0 w1",
                                                              "refusal": None},
                                      "logprobs": None, "finish_reason": "length", "stop_reason": None}]
        assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                                   "prompt_tokens_details": {"cached_tokens": 0}}


def test_logprobs_of_the_chosen_token(chat_server):
    r = chat_server.client.chat.completions.create(model="fake", messages=USER, max_tokens=2, logprobs=True,
                                                   top_logprobs=0)
    content = r.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes, t.top_logprobs) for t in content] == [
        (" w0", -0.5, list(b" w0"), []), (" w1", -1.0, list(b" w1"), [])]
    stream = chat_server.client.chat.completions.create(model="fake", messages=USER, max_tokens=2, logprobs=True,
                                                        stream=True)
    tokens = [t.logprob for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [-0.5, -1.0]


def test_n_choices_with_seeds(chat_server):
    engine = chat_server.engine
    r = chat_server.client.chat.completions.with_raw_response.create(model="fake", messages=USER, max_tokens=2,
                                                                     n=3, seed=7)
    request_id, answer = r.headers["x-request-id"], r.parse()
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.message.content == " w0 w1" for c in answer.choices)
    assert [p.seed for _, p in engine.requests[-3:]] == [7, 8, 9]
    assert engine.request_ids[-3:] == [f"{request_id}-{i}" for i in range(3)]
    assert answer.usage.completion_tokens == 6 and answer.usage.prompt_tokens == 4

    stream = chat_server.client.chat.completions.create(model="fake", messages=USER, max_tokens=2, n=2,
                                                        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    per_choice = {i: [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i] for i in (0, 1)}
    for choices in per_choice.values():
        assert choices[0].delta.role == "assistant" and choices[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in choices) == " w0 w1"
    assert chunks[-1].usage.completion_tokens == 4
    assert [p.seed for _, p in engine.requests[-2:]] == [None, None]
    assert idle(engine)


@pytest.mark.parametrize("extra, field", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                 "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "input_audio"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "tool"),
    ({"messages": []}, "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"n": 0}, "n=0"),
    ({"seed": 2 ** 64}, "seed"),
    ({"temperature": -0.5}, "temperature"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
    ({"stream_options": {"include_usage": True, "nope": 1}, "stream": True}, "stream_options.nope"),
])
def test_unsupported_or_bad_fields_are_400_naming_them(chat_server, extra, field):
    engine = chat_server.engine
    before = len(engine.requests)
    with pytest.raises(openai.BadRequestError) as e:
        chat_server.client.chat.completions.create(**{"model": "fake", "messages": USER, "max_tokens": 2, **extra})
    assert field in e.value.message
    assert e.value.body["message"] == e.value.message.removeprefix("Error code: 400 - ")
    assert len(engine.requests) == before  # refused before reaching the engine


def test_logit_bias_and_response_format_at_their_defaults_are_fine(chat_server):
    r = chat_server.client.chat.completions.create(model="fake", messages=USER, max_tokens=1, logit_bias={},
                                                   response_format={"type": "text"}, modalities=["text"])
    assert r.choices[0].message.content == " w0"


def test_model_without_chat_template_is_400(chat_server):
    with pytest.raises(openai.BadRequestError, match="has no chat template"):
        chat_server.client.chat.completions.create(model="plain", messages=USER)
    chat_server.state.engines["plain"].tokenizer = None  # a model folder without tokenizer files
    with pytest.raises(openai.BadRequestError, match="has no tokenizer"):
        chat_server.client.chat.completions.create(model="plain", messages=USER)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        chat_server.client.chat.completions.create(model="nope", messages=USER)


def test_one_failing_choice_aborts_the_others(chat_server):
    engine = chat_server.engine
    body = {"model": "fake", "messages": [{"role": "user", "content": "fail-others-after 2"}], "max_tokens": 50,
            "n": 2}
    r = httpx.post(chat_server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    assert engine.aborts[-1] == engine.request_ids[-2] and engine.aborts[-1].endswith("-0")
    assert wait_for(lambda: idle(engine)) and not chat_server.state.jobs

    r = httpx.post(chat_server.url + "/v1/chat/completions", json={**body, "stream": True})
    events = data_events(r.text)
    assert events[-1] == "[DONE]" and "boom" in json.loads(events[-2])["error"]["message"]
    assert wait_for(lambda: engine.aborts[-1] == engine.request_ids[-2])  # aborted once the stream closes
    assert wait_for(lambda: idle(engine)) and not chat_server.state.jobs
    with pytest.raises(openai.APIError, match="boom"):
        list(chat_server.client.chat.completions.create(model="fake", messages=body["messages"], max_tokens=50,
                                                         n=2, stream=True))


def test_disconnect_mid_stream_aborts_every_choice(chat_server):
    engine = chat_server.engine
    engine.delay = 0.05
    body = {"model": "fake", "messages": USER, "max_tokens": 50, "n": 2, "stream": True}
    with httpx.Client() as client, client.stream("POST", chat_server.url + "/v1/chat/completions", json=body) as r:
        request_id, lines = r.headers["x-request-id"], r.iter_lines()  # keep it: dropped, it closes the stream
        next(lines)
        assert engine.stats()["blocks_used"] >= 2 and not engine.aborts
    assert wait_for(lambda: sorted(engine.aborts) == [f"{request_id}-0", f"{request_id}-1"], timeout=3), engine.aborts
    assert engine.stats()["blocks_used"] == 0 and wait_for(lambda: not chat_server.state.jobs)


def test_n_is_admitted_all_or_nothing():
    engine = FakeEngine(chat_template="fake")
    with serve(create_app({"fake": engine}, max_queue=3)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=10)
        with pytest.raises(openai.RateLimitError, match="too many requests"):
            client.chat.completions.create(model="fake", messages=USER, max_tokens=1, n=4)
        assert len(engine.aborts) == 3 and idle(engine) and not live.state.jobs
        assert len(client.chat.completions.create(model="fake", messages=USER, max_tokens=1, n=3).choices) == 3


def test_completions_n_best_of_seed_suffix_and_v2(chat_server):
    client, engine = chat_server.client, chat_server.engine
    r = client.completions.create(model="fake", prompt="a b", max_tokens=2, n=2, best_of=2, seed=3, logprobs=0)
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [(0, " w0 w1", "length"),
                                                                       (1, " w0 w1", "length")]
    assert [c.logprobs.token_logprobs for c in r.choices] == [[-0.5, -1.0]] * 2
    assert [p.seed for _, p in engine.requests[-2:]] == [3, 4]
    assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 4
    chunks = list(client.completions.create(model="fake", prompt="a b", max_tokens=2, n=2, stream=True))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)}
    assert texts == {0: " w0 w1", 1: " w0 w1"}
    for kwargs, field in (({"best_of": 3, "n": 2}, "best_of"), ({"suffix": "end"}, "suffix"),
                          ({"seed": -2 ** 63 - 1}, "seed"), ({"n": 17}, "n=17"), ({"logprobs": 21}, "logprobs")):
        with pytest.raises(openai.BadRequestError, match=field):
            client.completions.create(model="fake", prompt="a", max_tokens=1, **kwargs)
    v2 = httpx.post(chat_server.url + "/v2/completions", json={"model": "fake", "prompt": "a", "max_tokens": 2})
    assert v2.status_code == 200 and v2.json()["object"] == "text_completion"
    assert v2.json()["choices"][0]["text"] == " w0 w1"


def test_openai_errors_carry_the_error_object():
    with serve(create_app({"fake": FakeEngine(chat_template="fake")}, api_key="k-1", max_body_bytes=2000)) as live:
        bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0, timeout=10)
        for call in (lambda: bad.chat.completions.create(model="fake", messages=USER),
                     lambda: bad.completions.create(model="fake", prompt="a"), lambda: bad.models.list()):
            with pytest.raises(openai.AuthenticationError) as e:
                call()
            assert "API key" in e.value.message and e.value.code == "401"
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="k-1", max_retries=0, timeout=10)
        with pytest.raises(openai.NotFoundError) as e:
            good.chat.completions.create(model="nope", messages=USER)
        assert "'nope' is not served here" in e.value.message
        with pytest.raises(openai.NotFoundError) as e:
            good.embeddings.create(model="fake", input="a")
        assert "no route POST /v1/embeddings" in e.value.message
        with pytest.raises(openai.APIStatusError) as e:
            good.chat.completions.create(model="fake", messages=[{"role": "user", "content": "a " * 2000}])
        assert e.value.status_code == 413 and "too large" in e.value.message
        headers = {"x-api-key": "k-1"}
        for path in ("/v2/chat/completions", "/v2/completions", "/v2/nothing-here"):
            r = httpx.post(live.url + path, json={}, headers=headers)
            assert r.status_code in (400, 404) and r.json()["error"]["message"] == r.json()["detail"], path
        r = httpx.get(live.url + "/v1/llm/model-endpoints/nope", headers=headers)  # LLM Engine: detail only
        assert r.status_code == 404 and "error" not in r.json()


# ---- the real default model (slow) ------------------------------------------------------------------------------


def real_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_real_chat_equals_completions_of_the_templated_prompt(llm_server):
    client, tokenizer = real_client(llm_server), llm_server.engine.tokenizer
    messages = [{"role": "user", "content": "Suggest a name for an icecream shop"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert templated.startswith("<|im_start|>system\n") and templated.endswith("<|im_start|>assistant\n")
    plain = client.completions.create(model=MODEL, prompt=templated, max_tokens=12, temperature=0)
    content = chat.choices[0].message.content
    assert content and content == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens == len(tokenizer.encode(templated,
                                                                                        add_special_tokens=False))
    v2 = httpx.post(llm_server.url + "/v2/completions", json={"model": MODEL, "prompt": templated,
                                                              "max_tokens": 12, "temperature": 0}, timeout=120)
    assert v2.json()["choices"][0]["text"] == content

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chat.usage.total_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: from the prefix cache
    assert wait_for(lambda: idle(llm_server.engine), timeout=5)


def test_real_n2_with_a_seed_is_reproducible(llm_server):
    client = real_client(llm_server)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Write a word."}], "max_tokens": 8,
           "temperature": 1.0, "n": 2, "seed": 1234}
    first, second = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert [c.index for c in first.choices] == [0, 1] and all(c.message.content for c in first.choices)
    assert 2 <= first.usage.completion_tokens <= 16 and first.usage == second.usage
    assert wait_for(lambda: idle(llm_server.engine), timeout=5)


def test_real_disconnect_mid_stream_with_n2_frees_every_block(llm_server):
    engine = llm_server.engine
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 400, "n": 2, "stream": True, "temperature": 0.8, "ignore_eos": True}
    before = engine.stats().get("tokens_generated", 0)

    async def run():
        async with httpx.AsyncClient(base_url=llm_server.url, timeout=120) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                seen = set()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        seen.add(json.loads(line[len("data: "):])["choices"][0]["index"])
                    if seen == {0, 1}:
                        break
                assert engine.stats()["blocks_used"] > 0
        # leaving the block drops the connection mid-stream

    asyncio.run(run())
    assert wait_for(lambda: idle(engine), timeout=5), engine.stats()
    assert wait_for(lambda: not llm_server.state.jobs, timeout=2)
    assert engine.stats().get("tokens_generated", 0) - before < 400  # both stopped early: 800 otherwise
