"""The examples of the LLM Engine Completion docs (an older edition), run against the live server with only
the model name changed.

Those examples: basic sync call, several temperatures, the response format,
sync streaming, async, async streaming. Plus: greedy streamed text equals sync text, and errors from the
real server map to the SDK's typed exceptions.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from llmengine import Completion, CompletionOutput, Model, api_engine
from llmengine.errors import NotFoundError

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def live(llm_server, monkeypatch):
    monkeypatch.delenv("SCALE_API_KEY", raising=False)
    api_engine.set_base_path(llm_server.url)
    api_engine.set_api_key(None)
    yield llm_server
    api_engine.set_base_path(None)


def test_basic_example(live):
    response = Completion.create(model_name=MODEL, prompt="Suggest a name for an icecream shop")
    assert isinstance(response.outputs[0].text, str) and response.outputs[0].text
    assert response.outputs[0].num_completion_tokens <= 20  # the SDK's default max_new_tokens
    assert response.output == response.outputs[0]


def test_temperatures_example(live):
    for temperature in [0.1, 0.5, 0.9]:
        response = Completion.create(model_name=MODEL, prompt="Suggest a name for an icecream shop",
                                     max_new_tokens=100, temperature=temperature, timeout=100)
        assert response.outputs[0].text
        assert 1 <= response.outputs[0].num_completion_tokens <= 100


def test_response_format_example(live):
    response = Completion.create(model_name=MODEL, prompt="Suggest a name for an icecream shop")
    [output] = response.outputs
    assert isinstance(output, CompletionOutput)
    assert repr(response.outputs).startswith("[CompletionOutput(text=")
    assert "num_completion_tokens=" in repr(response.outputs)
    body = json.loads(response.json())
    assert body["outputs"][0]["text"] == output.text and "traceback" in body


def test_streaming_example(live):
    stream = Completion.create(model_name=MODEL, prompt="why is the sky blue?", max_new_tokens=5,
                               temperature=0.2, stream=True)
    chunks = [json.loads(response.json()) for response in stream if response.output]
    assert [c["output"]["finished"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert 1 <= chunks[-1]["output"]["num_completion_tokens"] <= 5  # this model may end early at eos
    assert [c["output"]["num_completion_tokens"] for c in chunks] == sorted(c["output"]["num_completion_tokens"]
                                                                             for c in chunks)
    assert set(chunks[0]) >= {"output", "traceback"}


def test_async_example(live):
    async def main():
        response = await Completion.acreate(model_name=MODEL, prompt="Suggest a name for an icecream shop")
        return json.loads(response.json())

    body = asyncio.run(main())
    assert body["outputs"][0]["text"] and body["outputs"][0]["num_completion_tokens"] >= 1
    assert body["traceback"] is None


def test_async_streaming_example_and_greedy_stream_equals_sync(live):
    async def main():
        stream = await Completion.acreate(model_name=MODEL, prompt="Suggest a name for an icecream shop",
                                          temperature=0, max_new_tokens=24, stream=True)
        return [response async for response in stream if response.output]

    chunks = asyncio.run(main())
    assert [c.output.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    streamed = "".join(c.output.text for c in chunks)
    sync = Completion.create(model=MODEL, prompt="Suggest a name for an icecream shop", temperature=0,
                             max_new_tokens=24)
    assert streamed == sync.output.text
    assert "\ufffd" not in streamed and "â€" not in streamed


def test_errors_from_the_real_server(live):
    with pytest.raises(NotFoundError) as info:
        Completion.create(model_name="no-such-model", prompt="hi")
    assert info.value.status_code == 404 and MODEL in str(info.value)
    assert MODEL in [m.name for m in Model.list().model_endpoints]
    assert Model.get(MODEL).name == MODEL
