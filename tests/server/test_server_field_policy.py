"""The rule of server/field_policy.py, walked over vLLM's request fields: every field of vLLM's CompletionRequest and
ChatCompletionRequest (and OpenAI's own chat fields), sent with a value that would change the answer, is either
honoured (the check beside it sees its effect on what the engine was asked, or on the answer) or refused with a
400 that names it; a field that cannot change the answer is accepted and declared so. Never dropped.

The field lists are vLLM's (vllm/entrypoints/openai/protocol.py, CompletionRequest and ChatCompletionRequest,
with the sampling and extra params of its current docs), written here as data. Whether each honoured field then
changes the generation is tested in tests/runtime/test_logits_processors.py and test_server_vllm_fields.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from fake_engine import FakeEngine
from live_server import serve

from llmengine_runtime.server.app import create_app
from llmengine_runtime.server.chat_schemas import ChatCompletionRequest
from llmengine_runtime.server.completion_schemas import OpenAICompletionRequest

REFUSED, NO_EFFECT = "refused", "no effect"
Check = Callable[[FakeEngine, object, httpx.Response], bool]


def param(name: str, want: object) -> Check:
    return lambda engine, params, r: getattr(params, name) == want


def answer(test: Callable[[dict], bool]) -> Check:
    return lambda engine, params, r: test(r.json())


def streamed(engine, params, r) -> bool:
    return r.headers["content-type"].startswith("text/event-stream") and r.text.endswith("data: [DONE]\n\n")


def last_usage(r: httpx.Response) -> dict:
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return events[-1].get("usage") or {}


def prompt_logprobs_holder(answer: dict) -> dict:
    """Where vLLM puts prompt_logprobs: each completions choice, the chat answer itself."""
    return answer["choices"][0] if answer["object"] == "text_completion" else answer


# Fields both routes share: field -> (body fields to send, expectation)
SHARED: dict[str, tuple[dict, object]] = {
    "model": ({"model": "fake"}, answer(lambda a: a["model"] == "fake")),
    "frequency_penalty": ({"frequency_penalty": 0.5}, param("frequency_penalty", 0.5)),
    "presence_penalty": ({"presence_penalty": -0.5}, param("presence_penalty", -0.5)),
    "logit_bias": ({"logit_bias": {"3": 5}}, param("logit_bias", {3: 5.0})),
    "n": ({"n": 2}, answer(lambda a: [c["index"] for c in a["choices"]] == [0, 1])),
    "best_of": ({"best_of": 3}, REFUSED),
    "seed": ({"seed": 7}, param("seed", 7)),
    "stop": ({"stop": ["w9"]}, param("stop_sequences", ["w9"])),
    "stream": ({"stream": True}, streamed),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}},
                       lambda e, p, r: last_usage(r).get("completion_tokens") == 3),
    "temperature": ({"temperature": 3.5}, param("temperature", 3.5)),
    "top_p": ({"top_p": 0.5}, param("top_p", 0.5)),
    "user": ({"user": "someone"}, NO_EFFECT),
    "use_beam_search": ({"use_beam_search": True}, REFUSED),
    "top_k": ({"top_k": 5}, param("top_k", 5)),
    "min_p": ({"min_p": 0.1}, param("min_p", 0.1)),
    "repetition_penalty": ({"repetition_penalty": 1.3}, param("repetition_penalty", 1.3)),
    "length_penalty": ({"length_penalty": 0.5}, NO_EFFECT),
    "stop_token_ids": ({"stop_token_ids": [5]}, param("stop_token_ids", [5])),
    "include_stop_str_in_output": ({"include_stop_str_in_output": True}, param("include_stop_str_in_output", True)),
    "ignore_eos": ({"ignore_eos": True}, param("ignore_eos", True)),
    "min_tokens": ({"min_tokens": 2}, param("min_tokens", 2)),
    "skip_special_tokens": ({"skip_special_tokens": False}, param("skip_special_tokens", False)),
    "spaces_between_special_tokens": ({"spaces_between_special_tokens": False}, NO_EFFECT),
    "truncate_prompt_tokens": ({"truncate_prompt_tokens": 1}, param("truncate_prompt_tokens", 1)),
    "allowed_token_ids": ({"allowed_token_ids": [1, 2]}, param("allowed_token_ids", [1, 2])),
    "bad_words": ({"bad_words": ["w1"]}, param("bad_words", ["w1"])),
    "prompt_logprobs": ({"prompt_logprobs": 1}, lambda e, p, r: p.prompt_log_probs and p.prompt_top_log_probs == 1
                        and "prompt_logprobs" in prompt_logprobs_holder(r.json())),
    "response_format": ({"response_format": {"type": "json_object"}}, param("guided", ("json", {"type": "object"}))),
    "structured_outputs": ({"structured_outputs": {"regex": "a+"}}, param("guided", ("regex", "a+"))),
    "guided_json": ({"guided_json": {"type": "integer"}}, param("guided", ("json", {"type": "integer"}))),
    "guided_regex": ({"guided_regex": "[ab]+"}, param("guided", ("regex", "[ab]+"))),
    "guided_choice": ({"guided_choice": ["x", "y"]}, param("guided", ("choice", ["x", "y"]))),
    "guided_grammar": ({"guided_grammar": "start: \"a\""}, param("guided", ("grammar", "start: \"a\""))),
    "guided_decoding_backend": ({"guided_decoding_backend": "xgrammar"}, NO_EFFECT),
    "guided_whitespace_pattern": ({"guided_whitespace_pattern": " "}, REFUSED),
    "structural_tag": ({"structural_tag": "{}"}, REFUSED),
    "priority": ({"priority": 5}, REFUSED),
    "request_id": ({"request_id": "my-own-id"},
                   lambda e, p, r: e.request_ids[-1] == "my-own-id" and r.headers["x-request-id"] == "my-own-id"),
    "logits_processors": ({"logits_processors": ["my.Processor"]}, REFUSED),
    "return_token_ids": ({"return_token_ids": True}, answer(lambda a: a["choices"][0]["token_ids"] == [1, 2, 3])),
    "cache_salt": ({"cache_salt": "salt"}, REFUSED),
    "kv_transfer_params": ({"kv_transfer_params": {"do_remote_prefill": True}}, REFUSED),
    "vllm_xargs": ({"vllm_xargs": {"x": 1}}, REFUSED),
    "repetition_detection": ({"repetition_detection": {"max_pattern_size": 4}}, REFUSED),
    # OpenAI's fields that cannot change the answer
    "metadata": ({"metadata": {"team": "a"}}, NO_EFFECT),
    "service_tier": ({"service_tier": "flex"}, NO_EFFECT),
    "store": ({"store": True}, NO_EFFECT),
    "safety_identifier": ({"safety_identifier": "u-1"}, NO_EFFECT),
    "prompt_cache_key": ({"prompt_cache_key": "k"}, NO_EFFECT),
}

COMPLETION: dict[str, tuple[dict, object]] = {
    **SHARED,
    "prompt": ({"prompt": ["a b", "c"]}, answer(lambda a: len(a["choices"]) == 2)),
    "prompt_embeds": ({"prompt_embeds": "AAAA"}, REFUSED),
    "echo": ({"echo": True}, answer(lambda a: a["choices"][0]["text"] == "a b w0 w1 w2")),
    "logprobs": ({"logprobs": 2}, param("top_log_probs", 2)),
    "max_tokens": ({"max_tokens": 2}, param("max_new_tokens", 2)),
    "suffix": ({"suffix": "the end"}, REFUSED),
    "return_tokens_as_token_ids": ({"return_tokens_as_token_ids": True, "logprobs": 1}, answer(
        lambda a: a["choices"][0]["logprobs"]["tokens"] == ["token_id:1", "token_id:2", "token_id:3"])),
    "add_special_tokens": ({"add_special_tokens": False}, lambda e, p, r: not e.tokenizer.special_tokens_added[-1]),
}

ASSISTANT_LAST = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure,"}]
X_SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": X_SCHEMA}}]


def template_got(name: str, want: object) -> Check:
    return lambda engine, params, r: engine.tokenizer.template_kwargs[-1].get(name) == want


def prompt_text(test: Callable[[str], bool]) -> Check:
    return lambda engine, params, r: test(engine.tokenizer.decode(engine.requests[-1][0]))


CHAT: dict[str, tuple[dict, object]] = {
    **SHARED,
    "messages": ({"messages": [{"role": "user", "content": "other words"}]},
                 prompt_text(lambda t: t == "other words <|user|> <|assistant|>")),
    "logprobs": ({"logprobs": True}, param("return_token_log_probs", True)),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 2}, param("top_log_probs", 2)),
    "max_tokens": ({"max_tokens": 2}, param("max_new_tokens", 2)),
    "max_completion_tokens": ({"max_completion_tokens": 2}, param("max_new_tokens", 2)),
    "return_tokens_as_token_ids": ({"return_tokens_as_token_ids": True, "logprobs": True}, answer(
        lambda a: [t["token"] for t in a["choices"][0]["logprobs"]["content"]] == ["token_id:1", "token_id:2",
                                                                                   "token_id:3"])),
    "tools": ({"tools": TOOLS, "tool_choice": "required"},
              lambda e, p, r: p.guided[1]["items"]["anyOf"][0]["properties"]["parameters"] == X_SCHEMA),
    "tool_choice": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
                    param("guided", ("json", X_SCHEMA))),
    "parallel_tool_calls": ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
                            lambda e, p, r: p.guided[1]["maxItems"] == 1),
    "reasoning_effort": ({"reasoning_effort": "low"}, template_got("reasoning_effort", "low")),
    "include_reasoning": ({"include_reasoning": False}, NO_EFFECT),
    "echo": ({"echo": True, "messages": ASSISTANT_LAST},
             answer(lambda a: a["choices"][0]["message"]["content"] == "Sure, w0 w1 w2")),
    "add_generation_prompt": ({"add_generation_prompt": False}, prompt_text(lambda t: t == "hello there <|user|>")),
    "continue_final_message": ({"continue_final_message": True, "add_generation_prompt": False,
                                "messages": ASSISTANT_LAST}, prompt_text(lambda t: t == "hi <|user|> Sure,")),
    "add_special_tokens": ({"add_special_tokens": True}, lambda e, p, r: e.tokenizer.special_tokens_added[-1] is True),
    "documents": ({"documents": [{"title": "t", "text": "x"}]},
                  template_got("documents", [{"title": "t", "text": "x"}])),
    "chat_template": ({"chat_template": "{{ messages }}"}, REFUSED),
    "chat_template_kwargs": ({"chat_template_kwargs": {"enable_thinking": False}},
                             template_got("enable_thinking", False)),
    "mm_processor_kwargs": ({"mm_processor_kwargs": {"num_crops": 4}}, NO_EFFECT),
    "media_io_kwargs": ({"media_io_kwargs": {"video": {"num_frames": 8}}}, NO_EFFECT),
    # OpenAI's chat fields beyond vLLM's
    "functions": ({"functions": [{"name": "f", "parameters": {}}]}, REFUSED),
    "function_call": ({"function_call": "auto"}, REFUSED),
    "audio": ({"audio": {"voice": "alloy", "format": "wav"}}, REFUSED),
    "modalities": ({"modalities": ["text", "audio"]}, REFUSED),
    "prediction": ({"prediction": {"type": "content", "content": "x"}}, REFUSED),
    "web_search_options": ({"web_search_options": {}}, REFUSED),
    "verbosity": ({"verbosity": "low"}, REFUSED),
}

BASE = {"/v1/completions": {"model": "fake", "prompt": "a b", "max_tokens": 3},
        "/v1/chat/completions": {"model": "fake", "messages": [{"role": "user", "content": "hello there"}],
                                 "max_tokens": 3}}
ROUTES = {"/v1/completions": (COMPLETION, OpenAICompletionRequest),
          "/v1/chat/completions": (CHAT, ChatCompletionRequest)}
CASES = [(path, field) for path, (fields, _) in ROUTES.items() for field in fields]
IDS = [f"{'chat' if 'chat' in path else 'completions'}-{field}" for path, field in CASES]


@pytest.fixture(scope="module")
def live():
    engine = FakeEngine(chat_template="fake", delay=0.001)
    with serve(create_app({"fake": engine})) as server:
        server.engine = engine
        yield server


@pytest.mark.parametrize("path, field", CASES, ids=IDS)
def test_each_vllm_field_is_honoured_or_refused_by_name(live, path, field):
    fields, model = ROUTES[path]
    body, expect = fields[field]
    engine = live.engine
    before = len(engine.requests)
    r = httpx.post(live.url + path, json={**BASE[path], **body}, timeout=10)
    if expect == REFUSED:
        assert r.status_code == 400, (field, r.text)
        assert field in r.json()["error"]["message"] and len(engine.requests) == before
        return
    assert r.status_code == 200, (field, r.text)
    if expect == NO_EFFECT:
        assert field in model.NO_EFFECT and model.NO_EFFECT[field]  # declared, with the reason
        return
    params = engine.requests[-1][1]
    assert expect(engine, params, r), (field, params)
    assert field not in model.NO_EFFECT and field not in model.REFUSED


@pytest.mark.parametrize("path", list(ROUTES))
def test_every_declared_field_is_in_the_walk_and_unknown_ones_are_refused(live, path):
    fields, model = ROUTES[path]
    declared = set(model.model_fields) - {"speculative"}  # our own extension: tests/server/test_server_speculative.py
    assert declared - set(fields) == set()  # a field added to the model must be classified here
    r = httpx.post(live.url + path, json={**BASE[path], "min_tokenz": 3}, timeout=10)
    assert r.status_code == 400 and "min_tokenz" in r.json()["error"]["message"]
    assert "unknown field" in r.json()["error"]["message"]
