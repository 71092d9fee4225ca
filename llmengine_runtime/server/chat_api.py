"""Chat completions: OpenAI's `POST /v1/chat/completions` and LLM Engine's `POST /v2/chat/completions` (the
same body and answer, the model named in the body), enough for the `openai` client's
`chat.completions.create(...)`, plain and streamed, with `n` choices.

The messages go through the model's own chat template (tokenizer_config.json or the GGUF metadata), and the
templated text is tokenized without adding special tokens again (unless `add_special_tokens`): the template already
wrote them. A model without a template gets a 400 saying so. The body's rules are in chat_schemas.py. vLLM's
`continue_final_message` leaves the last message open for the model to go on with (instead of
`add_generation_prompt`), and `echo` puts that message's content before the answer's. vLLM's `prompt_logprobs` N
(0..20) puts the templated prompt's log-probs, ranks and top-N at the answer's top level; streamed, at the top level
of each choice's first chunk, beside `prompt_token_ids` (vLLM refuses N > 0 with stream and drops N = 0).

A stream sends `chat.completion.chunk` events: per choice first a delta with `role: "assistant"`, then the
content deltas, then an empty delta with its `finish_reason`; with `stream_options.include_usage` every chunk
has `usage: null` and a last chunk has `choices: []` and the usage. It ends with `data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmengine_runtime.server.chat_schemas import (
    ChatCompletionRequest,
    ChatTemplateFields,
    chat_sampling_params,
    template_kwargs,
    template_messages,
)
from llmengine_runtime.server.choices import ChoiceGroup, start_choices
from llmengine_runtime.server.errors import ApiError, ClientGone, GenerationError, bad_request
from llmengine_runtime.server.log_probs_format import chat_content, prompt_logprobs
from llmengine_runtime.server.middleware import use_request_id
from llmengine_runtime.server.openai_api import openai_frames
from llmengine_runtime.server.sampling_fields import num_choices
from llmengine_runtime.server.schemas import parse_body
from llmengine_runtime.server.sse import CLIENT_CLOSED, open_stream
from llmengine_runtime.server.state import ServedEngine, ServerState
from llmengine_runtime.server.tool_calls import ToolCallOutput
from llmengine_runtime.server.tools import ToolPlan, check_history, plan_tools, template_takes_tools


def chat_template(engine: ServedEngine, model: str) -> str:
    """The model's chat template, or a 400 saying why there is none."""
    tokenizer = engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        why = "has no tokenizer" if tokenizer is None else "has no chat template"
        raise bad_request(f"model {model!r} {why} (tokenizer_config.json chat_template or the GGUF's "
                          "tokenizer.chat_template), so it cannot serve chat completions: use /v1/completions "
                          "with a prompt of your own")
    return tokenizer.chat_template


def chat_prompt(engine: ServedEngine, model: str, req: ChatTemplateFields, tools: list | None = None) -> list[int]:
    """The messages through the model's chat template (with `tools` when it takes them), as token ids (no special
    tokens added again, unless add_special_tokens)."""
    tokenizer, template = engine.tokenizer, chat_template(engine, model)
    messages = template_messages(req.messages)
    check_history(messages, template)
    kwargs = template_kwargs(req)
    if tools is not None and template_takes_tools(template):
        kwargs["tools"] = tools
    continuing = bool(req.continue_final_message)
    generation_prompt = req.add_generation_prompt is not False  # null: the default, true
    if continuing and generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true: set "
                          "add_generation_prompt to false to continue the last message")
    if continuing and messages[-1]["role"] != "assistant":
        raise bad_request("continue_final_message needs the last message to be the assistant's")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                             **kwargs)
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise bad_request(f"the model's chat template rejected the messages: {e}") from None
    if continuing:  # cut what the template writes after the last message's content (its end-of-turn marker)
        final = messages[-1]["content"].rstrip()
        end = text.rfind(final) if final else -1
        if end < 0:
            raise bad_request("continue_final_message: the chat template did not write the last message's content "
                              "as it was given, so it cannot be continued")
        text = text[:end + len(final)]
    return tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))


def echo_text(req: ChatCompletionRequest) -> str:
    """vLLM's chat echo: the last message's content when it is the assistant's (the answer goes on from it)."""
    last = req.messages[-1] if req.messages else {}
    if not req.echo or last.get("role") != "assistant" or last.get("content") is None:
        return ""
    return template_messages([last])[0]["content"]


def chat_logprobs(out: Any, tokenizer: Any = None, top: int = 0, by_id: bool = False) -> dict:
    """OpenAI's chat `logprobs` for a delta's tokens, each with its `top` most likely alternatives
    (server/log_probs_format.py)."""
    return {"content": chat_content(out, tokenizer, top, by_id), "refusal": None}


class _Reply:
    """What one chat answer needs beside the deltas: the echo, log-probs, token ids and usage options."""

    def __init__(self, req: ChatCompletionRequest, engine: ServedEngine, prompt: list[int], want_log_probs: bool,
                 top: int, n: int, plan: ToolPlan) -> None:
        self.n, self.echo, self.want_log_probs = n, echo_text(req), want_log_probs
        self.tools = [ToolCallOutput(plan) for _ in range(n)] if plan.choice != "none" else None
        self.logprobs = partial(chat_logprobs, tokenizer=engine.tokenizer, top=top,
                                by_id=bool(req.return_tokens_as_token_ids))
        self.token_ids = bool(req.return_token_ids)
        self.prompt_ids = prompt
        self.prompt_top = req.prompt_logprobs  # vLLM's prompt_logprobs N (None: not asked)
        self.tokenizer = engine.tokenizer
        options = req.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = self.include_usage and bool(options.continuous_usage_stats)


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    @app.post("/v2/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(await request.body(), ChatCompletionRequest)
        use_request_id(request, req.request_id)
        model = state.model_name(req.model)
        engine = state.engine(model)
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, chat_template(engine, model),
                          state.tool_call_parser)
        prompt = chat_prompt(engine, model, req, plan.tools)
        params = chat_sampling_params(req, len(prompt), engine.max_model_len)
        if plan.constraint is not None:  # tool_choice required or named: the guided-JSON path enforces the call
            if params.guided is not None:
                raise bad_request(f"tool_choice {req.tool_choice!r} constrains the answer already: it cannot be "
                                  "combined with response_format, structured_outputs or guided_*")
            params.guided = ("json", plan.constraint)
        n = num_choices(req)
        group = start_choices(state, request, model, [prompt], params, n, stream=bool(req.stream))
        head = {"id": f"chatcmpl-{request.state.request_id}", "created": int(time.time()), "model": model,
                "system_fingerprint": None}
        keep = params.truncate_prompt_tokens
        reply = _Reply(req, engine, prompt[-keep:] if keep else prompt, params.return_token_log_probs,
                       params.top_log_probs, n, plan)
        if req.stream:
            frames = openai_frames(_chunks(group, head, reply))
            return await open_stream(group, state, frames) or Response(status_code=CLIENT_CLOSED)
        return await _answer(group, head, reply)


async def _answer(group: ChoiceGroup, head: dict, reply: _Reply) -> Response:
    n = reply.n
    text: list[list[str]] = [[reply.echo] for _ in range(n)]
    log_probs: list[list[dict]] = [[] for _ in range(n)]
    token_ids: list[list[int]] = [[] for _ in range(n)]
    last: list[Any] = [None] * n
    prompt_lps: list | None = None
    try:
        async for i, out in group.outputs():
            if reply.prompt_top is not None and prompt_lps is None and out.prompt_log_probs is not None:
                prompt_lps = prompt_logprobs(out, reply.tokenizer, reply.prompt_top)  # (every choice's prompt)
            text[i].append(out.text)
            token_ids[i] += out.token_ids
            if reply.want_log_probs:
                log_probs[i] += reply.logprobs(out)["content"]
            last[i] = out
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except GenerationError as e:
        raise ApiError(e.status, e.message) from None
    finally:
        group.close()
    choices = []
    for i in range(n):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text[i]), "refusal": None}
        finish_reason = last[i].finish_reason
        if reply.tools is not None:
            fields, called = reply.tools[i].message("".join(text[i][1:]))  # (no echo before a tool call)
            message.update(fields)
            finish_reason = reply.tools[i].finish_reason(finish_reason, called)
        choices.append({"index": i, "message": message,
                        "logprobs": {"content": log_probs[i], "refusal": None} if reply.want_log_probs else None,
                        "finish_reason": finish_reason, "stop_reason": last[i].stop_reason,
                        **({"token_ids": token_ids[i]} if reply.token_ids else {})})
    ids = {"prompt_token_ids": reply.prompt_ids} if reply.token_ids else {}
    if reply.prompt_top is not None:
        ids["prompt_logprobs"] = prompt_lps
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": group.usage(), **ids})


async def _chunks(group: ChoiceGroup, head: dict, reply: _Reply) -> AsyncIterator[dict]:
    head = {**head, "object": "chat.completion.chunk", **({"usage": None} if reply.include_usage else {})}

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None,
              stop_reason: int | str | None = None, token_ids: list[int] | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                  "stop_reason": stop_reason, **({"token_ids": token_ids or []} if reply.token_ids else {})}
        usage = {"usage": group.choice_usage(index)} if reply.continuous_usage else {}
        return {**head, "choices": [choice], **usage}

    started = [False] * reply.n
    async for i, out in group.outputs():
        if not started[i]:  # sent with the choice's first delta, so a failure before it is still a status
            started[i] = True
            first = chunk(i, {"role": "assistant", "content": reply.echo})
            if reply.token_ids:
                first["prompt_token_ids"] = reply.prompt_ids
            if reply.prompt_top is not None:  # the choice's first output carries its prompt's scores
                first["prompt_logprobs"] = prompt_logprobs(out, reply.tokenizer, reply.prompt_top)
            yield first
        logprobs = reply.logprobs(out) if reply.want_log_probs else None
        if reply.tools is not None:
            deltas, called = reply.tools[i].deltas(out.text, out.finished)
            ids = out.token_ids
            for delta in deltas:
                yield chunk(i, delta, logprobs=logprobs, token_ids=ids)
                logprobs, ids = None, []  # sent once, with the first delta
            if out.finished:
                yield chunk(i, {}, reply.tools[i].finish_reason(out.finish_reason, called),
                            stop_reason=out.stop_reason)
            continue
        if out.text or ((reply.want_log_probs or reply.token_ids) and out.token_ids):
            yield chunk(i, {"content": out.text}, logprobs=logprobs, token_ids=out.token_ids)
        if out.finished:
            yield chunk(i, {}, out.finish_reason, stop_reason=out.stop_reason)
    if reply.include_usage:
        yield {**head, "choices": [], "usage": group.usage()}
