"""Tool calling on chat completions (server/tools.py, server/tool_calls.py): tools with tool_choice "none", histories
with tool calls and results, "required" and named tools through the guided-JSON path, "auto" behind
--tool-call-parser hermes, each plain and streamed through the `openai` client. Fake-engine tests first (the answer
scripted), the real default model at the end (slow)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from fake_engine import FakeEngine
from live_server import MODEL, serve, wait_for

from llmengine_runtime.server.app import create_app

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
USER = [{"role": "user", "content": "weather in Paris?"}]
TEMPLATE = "fake: takes tools, renders tool_calls and 'tool' messages"


@pytest.fixture
def live():
    engine = FakeEngine(chat_template=TEMPLATE)
    plain = FakeEngine(name="plain", chat_template="fake")
    with serve(create_app({"fake": engine, "plain": plain}, tool_call_parser="hermes")) as server:
        server.engine = engine
        server.client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=10)
        yield server


def test_tools_with_tool_choice_none_reach_the_template(live):
    r = live.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice="none",
                                            parallel_tool_calls=False, max_tokens=2)
    assert r.choices[0].message.content == " w0 w1" and not r.choices[0].message.tool_calls
    assert live.engine.tokenizer.template_kwargs[-1]["tools"] == TOOLS
    assert live.engine.requests[-1][1].guided is None
    with pytest.raises(openai.BadRequestError, match="does not take tools"):  # they would be dropped there
        live.client.chat.completions.create(model="plain", messages=USER, tools=TOOLS, tool_choice="none")


def test_a_history_with_tool_calls_and_results(live):
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = live.client.chat.completions.create(model="fake", messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=1)
    assert r.choices[0].finish_reason == "length"
    assistant, tool = live.engine.tokenizer.messages[-1][1:]
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].tool_calls"):
        live.client.chat.completions.create(model="plain", messages=history, max_tokens=1)


@pytest.mark.parametrize("body, problem", [
    ({"tools": TOOLS}, "--tool-call-parser"),  # "auto" by default, on the server without a parser below
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tool_choice": "required", "tools": TOOLS, "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "code_interpreter"}], "tool_choice": "required"}, "tools[0]"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
])
def test_tool_requests_that_cannot_be_served_are_400s(body, problem):
    with serve(create_app({"fake": FakeEngine(chat_template=TEMPLATE)})) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=10)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="fake", messages=USER, max_tokens=2, extra_body=body)
        assert problem in e.value.message


def test_required_is_enforced_by_the_tools_schemas(live):
    live.engine.reply = ['[{"name": "get_weather", ', '"parameters": {"city": "Paris"}}]']
    r = live.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=20)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and r.choices[0].finish_reason == "tool_calls"
    kind, schema = live.engine.requests[-1][1].guided
    assert kind == "json" and schema["maxItems"] == 1
    assert [item["properties"]["name"]["const"] for item in schema["items"]["anyOf"]] == ["get_weather", "get_time"]
    stream = live.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice="required",
                                                 max_tokens=20, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"})]
    assert deltas[-1].finish_reason == "tool_calls"


def test_a_named_tool_streams_its_arguments(live):
    live.engine.reply = ['{"city": ', '"Paris", ', '"days": 2}']
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = live.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice=choice,
                                            max_tokens=20)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert live.engine.requests[-1][1].guided == ("json", WEATHER) and r.choices[0].finish_reason == "stop"
    stream = list(live.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice=choice,
                                                      max_tokens=20, stream=True))
    parts = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert parts[0].id.startswith("call_") and parts[0].function.name == "get_weather"
    assert "".join(p.function.arguments for p in parts) == '{"city": "Paris", "days": 2}' and len(parts) == 4


def test_auto_with_the_hermes_parser(live):
    live.engine.reply = ["Let me check.", " <tool_", 'call>{"name": "get_weather", "arguments": {"city": "Paris"}}',
                         '</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>']
    r = live.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, max_tokens=20)
    message = r.choices[0].message
    assert message.content == "Let me check." and r.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert live.engine.requests[-1][1].guided is None  # the model decides
    one = live.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, max_tokens=20,
                                              parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    chunks = [c.choices[0] for c in live.client.chat.completions.create(
        model="fake", messages=USER, tools=TOOLS, max_tokens=20, stream=True) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == "Let me check. "  # nothing of the block
    assert [tc.function.name for c in chunks for tc in (c.delta.tool_calls or [])] == ["get_weather", "get_time"]
    live.engine.reply = ["No tool needed."]
    plain = live.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, max_tokens=20)
    assert plain.choices[0].message.content == "No tool needed." and plain.choices[0].finish_reason == "stop"
    assert wait_for(lambda: not live.state.jobs)


# ---- the real default model (slow) ------------------------------------------------------------------------------
def test_real_required_and_named_tool_calls_validate_against_the_schema(llm_server):
    client = openai.OpenAI(base_url=llm_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                       max_tokens=60, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=named,
                                            max_tokens=60, temperature=0, stream=True)
    parts = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert parts[0].function.name == "get_weather"
    jsonschema.validate(json.loads("".join(p.function.arguments or "" for p in parts)), WEATHER)
