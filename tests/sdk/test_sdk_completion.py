"""Completion.create / acreate against the fake server: sync, stream, async, async stream."""

import asyncio
import base64
import json
import warnings

import pytest
from llmengine import (
    Completion,
    CompletionOutput,
    CompletionStreamV1Response,
    CompletionSyncV1Response,
    api_engine,
)
from sdk_fake_server import PIECES, REQUEST_ID

FULL_TEXT = "".join(PIECES)
BODY_FIELDS = {
    "prompt", "max_new_tokens", "temperature", "stop_sequences", "return_token_log_probs",
    "presence_penalty", "frequency_penalty", "top_k", "top_p", "include_stop_str_in_output",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "skip_special_tokens",
}


def test_sync_with_seed_spelling_gives_outputs_and_output(fake):
    response = Completion.create(model_name="echo", prompt="Suggest a name for an icecream shop")
    assert isinstance(response, CompletionSyncV1Response)
    assert response.request_id == REQUEST_ID
    assert response.outputs[0].text == response.output.text == FULL_TEXT
    assert response.outputs == [
        CompletionOutput(text=FULL_TEXT, num_prompt_tokens=3, num_completion_tokens=len(PIECES))
    ]
    assert repr(response.outputs[0]) == (
        f"CompletionOutput(text={FULL_TEXT!r}, num_prompt_tokens=3, num_completion_tokens={len(PIECES)})"
    )


def test_sync_json_and_dict_have_the_documented_shape_without_warnings(fake):
    response = Completion.create(model="echo", prompt="hi", max_new_tokens=2)
    expected = {
        "request_id": REQUEST_ID,
        "outputs": [{"text": "I scream", "num_prompt_tokens": 3, "num_completion_tokens": 2}],
        "traceback": None,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert json.loads(response.json()) == expected
        assert response.dict() == expected
    assert response.model_dump()["output"]["text"] == "I scream"  # full pydantic dump keeps both


def test_body_has_every_field_with_nulls_and_defaults(fake):
    Completion.create(model="echo", prompt="p")
    (body,) = fake.bodies
    assert set(body) == BODY_FIELDS
    assert body == {
        "prompt": "p", "max_new_tokens": 20, "temperature": 0.2, "stop_sequences": None,
        "return_token_log_probs": False, "presence_penalty": None, "frequency_penalty": None,
        "top_k": None, "top_p": None, "include_stop_str_in_output": None, "guided_json": None,
        "guided_regex": None, "guided_choice": None, "guided_grammar": None, "skip_special_tokens": True,
    }
    (hit,) = fake.hits
    assert (hit["method"], hit["path"], hit["query"]) == (
        "POST", "/v1/llm/completions-sync", "model_endpoint_name=echo")
    assert hit["headers"]["content-type"] == "application/json"


def test_body_carries_every_given_parameter(fake):
    stream = Completion.create(
        model="echo", prompt="p", max_new_tokens=3, temperature=0.7, stop_sequences=["\n"],
        return_token_log_probs=True, presence_penalty=0.5, frequency_penalty=1.5, top_k=40, top_p=0.9,
        include_stop_str_in_output=True, stream=True,
    )
    assert len(list(stream)) == 3
    (body,) = fake.bodies
    assert body["max_new_tokens"] == 3 and body["temperature"] == 0.7
    assert body["stop_sequences"] == ["\n"] and body["return_token_log_probs"] is True
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == 1.5
    assert body["top_k"] == 40 and body["top_p"] == 0.9 and body["include_stop_str_in_output"] is True
    assert fake.hits[0]["path"] == "/v1/llm/completions-stream"


def test_token_log_probs_are_parsed_and_shown(fake):
    response = Completion.create(model="echo", prompt="p", max_new_tokens=2, return_token_log_probs=True)
    assert [(t.token, t.log_prob) for t in response.output.tokens] == [("I", 0.0), (" scream", -0.5)]
    assert json.loads(response.json())["outputs"][0]["tokens"][1] == {"token": " scream", "log_prob": -0.5}


def test_sync_stream_yields_each_piece_in_order(fake):
    stream = Completion.create(model="echo", prompt="p", stream=True)
    chunks = list(stream)
    assert all(isinstance(c, CompletionStreamV1Response) for c in chunks)
    assert [c.output.text for c in chunks] == PIECES
    assert [c.output.finished for c in chunks] == [False] * (len(PIECES) - 1) + [True]
    assert [c.output.num_completion_tokens for c in chunks] == list(range(1, len(PIECES) + 1))
    assert json.loads(chunks[0].json()) == {
        "request_id": REQUEST_ID,
        "output": {"text": "I", "finished": False, "num_prompt_tokens": 3, "num_completion_tokens": 1},
        "traceback": None,
    }


def test_stream_tokens_when_asked(fake):
    chunks = list(Completion.create(model="echo", prompt="p", max_new_tokens=2, stream=True,
                                    return_token_log_probs=True))
    tokens = [(c.output.token.token, c.output.token.log_prob) for c in chunks]
    assert tokens == [("I", 0.0), (" scream", -0.5)]


def test_quirky_stream_crlf_comments_no_space_multiline_split_utf8_and_done(fake):
    chunks = list(Completion.create(model="quirky", prompt="p", stream=True))
    # Two chunks, then [DONE]: the junk after it is never parsed (it would raise).
    assert [c.output.text for c in chunks] == ["Don", "\u2019t"]
    assert chunks[-1].output.finished


def test_midstream_error_is_yielded_as_a_chunk_with_error(fake):
    chunks = list(Completion.create(model="midstream-error", prompt="p", stream=True))
    assert chunks[0].output.text == "I" and chunks[0].error is None
    last = chunks[-1]
    assert last.output is None
    assert last.error.status_code == 500
    assert last.error.content.error == "fake engine crashed"
    assert json.loads(last.json())["error"]["content"]["error"] == "fake engine crashed"


def test_async_sync_response(fake):
    async def main():
        return await Completion.acreate(model_name="echo", prompt="p", max_new_tokens=4)

    response = asyncio.run(main())
    assert response.outputs[0].text == response.output.text == "".join(PIECES[:4])
    assert fake.bodies[0]["max_new_tokens"] == 4


def test_async_stream_the_seed_way(fake):
    async def main():
        stream = await Completion.acreate(model_name="echo", prompt="p", stream=True)
        return [response async for response in stream if response.output]

    chunks = asyncio.run(main())
    assert [c.output.text for c in chunks] == PIECES
    assert chunks[-1].output.finished


def test_async_quirky_and_midstream_error(fake):
    async def main(model):
        stream = await Completion.acreate(model=model, prompt="p", stream=True)
        return [c async for c in stream]

    assert [c.output.text for c in asyncio.run(main("quirky"))] == ["Don", "\u2019t"]
    assert asyncio.run(main("midstream-error"))[-1].error.status_code == 500


def test_request_headers_are_sent(fake):
    Completion.create(model="echo", prompt="p", request_headers={"x-trace": "abc"})
    assert fake.hits[0]["headers"]["x-trace"] == "abc"


@pytest.mark.parametrize("how", ["set_api_key", "env"])
def test_auth_is_basic_with_key_as_user_plus_x_api_key(fake, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("SCALE_API_KEY", "secret-key")
    else:
        api_engine.set_api_key("secret-key")
    Completion.create(model="echo", prompt="p")
    list(Completion.create(model="echo", prompt="p", stream=True))
    asyncio.run(Completion.acreate(model="echo", prompt="p"))
    assert len(fake.hits) == 3
    for hit in fake.hits:
        assert hit["headers"]["x-api-key"] == "secret-key"
        assert hit["headers"]["authorization"] == "Basic " + base64.b64encode(b"secret-key:").decode()


def test_set_api_key_wins_over_env(fake, monkeypatch):
    monkeypatch.setenv("SCALE_API_KEY", "from-env")
    api_engine.set_api_key("from-code")
    Completion.create(model="echo", prompt="p")
    assert fake.hits[0]["headers"]["x-api-key"] == "from-code"


def test_no_key_no_auth_headers(fake):
    Completion.create(model="echo", prompt="p")
    asyncio.run(Completion.acreate(model="echo", prompt="p"))
    for hit in fake.hits:
        assert "authorization" not in hit["headers"] and "x-api-key" not in hit["headers"]


@pytest.mark.parametrize("suffix", ["llm-engine", "llm-engine/"])
def test_base_path_with_and_without_trailing_slash_keeps_its_last_segment(fake, suffix):
    api_engine.set_base_path(fake.url + suffix)
    assert Completion.create(model="echo", prompt="p").output.text == FULL_TEXT
    assert [c.output.text for c in Completion.create(model="echo", prompt="p", stream=True)] == PIECES
    assert [h["path"] for h in fake.hits] == [
        "/llm-engine/v1/llm/completions-sync", "/llm-engine/v1/llm/completions-stream"]


def test_base_path_from_env_without_trailing_slash(fake, monkeypatch):
    api_engine.set_base_path(None)
    monkeypatch.setenv("LLM_ENGINE_BASE_PATH", fake.url.rstrip("/"))
    assert Completion.create(model="echo", prompt="p").output.text == FULL_TEXT
    assert fake.hits[0]["path"] == "/v1/llm/completions-sync"


def test_default_base_path_is_local_port_5005(monkeypatch):
    monkeypatch.delenv("LLM_ENGINE_BASE_PATH", raising=False)
    api_engine.set_base_path(None)
    assert api_engine.get_base_path() == "http://127.0.0.1:5005/"
    assert api_engine.url_for("v1/llm/completions-sync") == "http://127.0.0.1:5005/v1/llm/completions-sync"
