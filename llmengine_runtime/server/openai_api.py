"""OpenAI-compatible `POST /v1/completions` (plain and streamed, `n` choices) and `GET /v1/models`, enough for
the `openai` Python client: `OpenAI(base_url="http://127.0.0.1:5005/v1", api_key=KEY).completions.create(...)`;
LLM Engine's `POST /v2/completions` is the same route. Chat completions live in chat_api.py.

Unlike the LLM Engine stream, these streams end with `data: [DONE]`, as OpenAI's do, and every error under
these paths carries OpenAI's `{"error": {"message", "type", "code"}}` object beside `detail`
(`is_openai_path`). `logprobs` N (0..20) gives each token's log-prob and, as `top_logprobs`, its N most likely
alternatives (plus the chosen token); `echo` returns the prompt before the completion, with its tokens'
log-probs (the first null) when `logprobs` is set, and with `max_tokens` 0 scores a text without generating
(server/log_probs_format.py). `n` choices are n engine requests (choices.py); `best_of` may only equal `n`;
`suffix` is refused.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmengine_runtime.server.choices import ChoiceGroup, start_choices
from llmengine_runtime.server.errors import ApiError, ClientGone, GenerationError
from llmengine_runtime.server.log_probs_format import LegacyLogProbs
from llmengine_runtime.server.schemas import (
    OpenAICompletionRequest,
    completion_choices,
    openai_prompt,
    parse_body,
    sampling_params_openai,
)
from llmengine_runtime.server.sse import CLIENT_CLOSED, open_stream, sse
from llmengine_runtime.server.state import ServedEngine, ServerState

DONE = b"data: [DONE]\n\n"


def is_openai_path(path: str) -> bool:
    """Paths whose errors carry OpenAI's error object: all of /v1/ (the openai client's base URL, so an
    unknown route there too) except LLM Engine's /v1/llm/, and LLM Engine's OpenAI-style /v2/."""
    return path.startswith(("/v1/", "/v2/")) and not path.startswith("/v1/llm/")


def error_object(status: int, message: str) -> dict:
    """OpenAI's error object, which the `openai` client reads its exception message from."""
    return {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
            "param": None, "code": status}


async def openai_frames(payloads: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """SSE frames of an OpenAI-style stream, then `data: [DONE]`. A client that left gets nothing more; an
    engine failure before the first frame propagates (open_stream answers it with its status), after it
    becomes an error event, which the openai client raises."""
    sent = False
    try:
        async for payload in payloads:
            yield sse(payload)
            sent = True
    except ClientGone:
        return
    except GenerationError as e:
        if not sent:
            raise
        yield sse({"error": error_object(e.status, e.message)})
    finally:
        await payloads.aclose()
    yield DONE


class _Echo:
    """One request's echo: the prompt text (and, with logprobs, its tokens' log-probs) before each choice's
    first output."""

    def __init__(self, req: OpenAICompletionRequest, prompt: str | list[int], engine: ServedEngine) -> None:
        self.on = bool(req.echo)
        tokenizer = engine.tokenizer
        self.text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt) if tokenizer else ""
        self.top = req.logprobs
        self.tokenizer = tokenizer
        self.started: set[int] = set()

    def log_probs(self) -> LegacyLogProbs:
        return LegacyLogProbs(self.tokenizer, self.top, per_token_text=bool(self.top) or self.on)

    def first(self, i: int, out: Any, log_probs: LegacyLogProbs) -> str:
        """The text to put before choice i's output `out`: the prompt on its first output, else ""."""
        if not self.on or i in self.started:
            return ""
        self.started.add(i)
        if self.top is not None and out.prompt_log_probs is not None:
            log_probs.add_prompt(out)
        return self.text


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def list_models() -> dict:
        state.require_ready()
        return {"object": "list", "data": [_model(name, engine) for name, engine in state.engines.items()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict:
        return _model(name, state.engine(name))

    @app.post("/v1/completions")
    @app.post("/v2/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(await request.body(), OpenAICompletionRequest)
        state.engine(req.model)
        prompt, params, n = openai_prompt(req), sampling_params_openai(req), completion_choices(req)
        echo = _Echo(req, prompt, state.engine(req.model))
        group = start_choices(state, request, req.model, prompt, params, n, stream=bool(req.stream))
        head = {"id": f"cmpl-{request.state.request_id.replace('-', '')}", "object": "text_completion",
                "created": int(time.time()), "model": req.model}
        want_log_probs = params.return_token_log_probs
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            frames = openai_frames(_stream(group, head, want_log_probs, include_usage, n, echo))
            return await open_stream(group, state, frames) or Response(status_code=CLIENT_CLOSED)
        log_probs, text = [echo.log_probs() for _ in range(n)], [[] for _ in range(n)]
        finish_reason: list[str | None] = [None] * n
        try:
            async for i, out in group.outputs():
                text[i].append(echo.first(i, out, log_probs[i]) + out.text)
                log_probs[i].add(out)
                finish_reason[i] = out.finish_reason
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except GenerationError as e:
            raise ApiError(e.status, e.message) from None
        finally:
            group.close()
        choices = [{"index": i, "text": "".join(text[i]), "finish_reason": finish_reason[i],
                    "logprobs": log_probs[i].since(0) if want_log_probs else None} for i in range(n)]
        return JSONResponse({**head, "choices": choices, "usage": group.usage(), "system_fingerprint": None})


def _model(name: str, engine: ServedEngine) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmengine",
            "max_model_len": engine.max_model_len}


async def _stream(group: ChoiceGroup, head: dict, want_log_probs: bool, include_usage: bool,
                  n: int, echo: _Echo) -> AsyncIterator[dict]:
    log_probs = [echo.log_probs() for _ in range(n)]
    async for i, out in group.outputs():
        start = len(log_probs[i].tokens)
        text = echo.first(i, out, log_probs[i]) + out.text
        log_probs[i].add(out)
        if not text and not out.finished and not (want_log_probs and out.token_ids):
            continue
        choice = {"index": i, "text": text, "finish_reason": out.finish_reason if out.finished else None,
                  "logprobs": log_probs[i].since(start) if want_log_probs else None}
        yield {**head, "choices": [choice]}
    if include_usage:
        yield {**head, "choices": [], "usage": group.usage()}
