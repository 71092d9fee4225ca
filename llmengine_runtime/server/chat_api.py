"""Chat completions: OpenAI's `POST /v1/chat/completions` and LLM Engine's `POST /v2/chat/completions` (the
same body and answer, the model named in the body), enough for the `openai` client's
`chat.completions.create(...)`, plain and streamed, with `n` choices.

The messages go through the model's own chat template (tokenizer_config.json or the GGUF metadata), and the
templated text is tokenized without adding special tokens again: the template already wrote them. A model
without a template gets a 400 saying so. The body's rules are in chat_schemas.py.

A stream sends `chat.completion.chunk` events: per choice first a delta with `role: "assistant"`, then the
content deltas, then an empty delta with its `finish_reason`; with `stream_options.include_usage` every chunk
has `usage: null` and a last chunk has `choices: []` and the usage. It ends with `data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmengine_runtime.server.chat_schemas import (
    ChatCompletionRequest,
    chat_sampling_params,
    refuse_unsupported,
    template_messages,
)
from llmengine_runtime.server.choices import ChoiceGroup, start_choices
from llmengine_runtime.server.errors import ApiError, ClientGone, GenerationError, bad_request
from llmengine_runtime.server.log_probs_format import chat_content
from llmengine_runtime.server.openai_api import openai_frames
from llmengine_runtime.server.schemas import parse_body
from llmengine_runtime.server.sse import CLIENT_CLOSED, open_stream
from llmengine_runtime.server.state import ServedEngine, ServerState


def chat_prompt(engine: ServedEngine, model: str, messages: list[dict[str, Any]]) -> list[int]:
    """The messages through the model's chat template, as token ids (no special tokens added again)."""
    tokenizer = engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        why = "has no tokenizer" if tokenizer is None else "has no chat template"
        raise bad_request(f"model {model!r} {why} (tokenizer_config.json chat_template or the GGUF's "
                          "tokenizer.chat_template), so it cannot serve chat completions: use /v1/completions "
                          "with a prompt of your own")
    try:
        text = tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=True)
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise bad_request(f"the model's chat template rejected the messages: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def chat_logprobs(out: Any, tokenizer: Any = None, top: int = 0) -> dict:
    """OpenAI's chat `logprobs` for a delta's tokens, each with its `top` most likely alternatives
    (server/log_probs_format.py)."""
    return {"content": chat_content(out, tokenizer, top), "refusal": None}


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    @app.post("/v2/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(await request.body(), ChatCompletionRequest)
        engine = state.engine(req.model)
        refuse_unsupported(req)
        prompt = chat_prompt(engine, req.model, req.messages)
        params = chat_sampling_params(req, len(prompt), engine.max_model_len)
        n = 1 if req.n is None else req.n
        group = start_choices(state, request, req.model, prompt, params, n, stream=bool(req.stream))
        head = {"id": f"chatcmpl-{request.state.request_id.replace('-', '')}", "created": int(time.time()),
                "model": req.model, "system_fingerprint": None}
        want_log_probs = params.return_token_log_probs
        logprobs = partial(chat_logprobs, tokenizer=engine.tokenizer, top=params.top_log_probs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            frames = openai_frames(_chunks(group, head, want_log_probs, include_usage, n, logprobs))
            return await open_stream(group, state, frames) or Response(status_code=CLIENT_CLOSED)
        return await _answer(group, head, want_log_probs, n, logprobs)


async def _answer(group: ChoiceGroup, head: dict, want_log_probs: bool, n: int,
                  logprobs: Callable[[Any], dict] = chat_logprobs) -> Response:
    text: list[list[str]] = [[] for _ in range(n)]
    log_probs: list[list[dict]] = [[] for _ in range(n)]
    finish_reason: list[str | None] = [None] * n
    try:
        async for i, out in group.outputs():
            text[i].append(out.text)
            if want_log_probs:
                log_probs[i] += logprobs(out)["content"]
            finish_reason[i] = out.finish_reason
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except GenerationError as e:
        raise ApiError(e.status, e.message) from None
    finally:
        group.close()
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(text[i]), "refusal": None},
                "logprobs": {"content": log_probs[i], "refusal": None} if want_log_probs else None,
                "finish_reason": finish_reason[i]} for i in range(n)]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": group.usage()})


async def _chunks(group: ChoiceGroup, head: dict, want_log_probs: bool, include_usage: bool,
                  n: int, logprobs: Callable[[Any], dict] = chat_logprobs) -> AsyncIterator[dict]:
    head = {**head, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}]}

    started = [False] * n
    async for i, out in group.outputs():
        if not started[i]:  # sent with the choice's first delta, so a failure before it is still a status
            started[i] = True
            yield chunk(i, {"role": "assistant", "content": ""})
        if out.text or (want_log_probs and out.token_ids):
            yield chunk(i, {"content": out.text}, logprobs=logprobs(out) if want_log_probs else None)
        if out.finished:
            yield chunk(i, {}, out.finish_reason)
    if include_usage:
        yield {**head, "choices": [], "usage": group.usage()}
