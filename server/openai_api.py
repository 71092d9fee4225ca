"""OpenAI-compatible `POST /v1/completions` (plain and streamed) and `GET /v1/models`, enough for the `openai`
Python client: `OpenAI(base_url="http://127.0.0.1:5005/v1", api_key=KEY).completions.create(...)`.

Unlike the LLM Engine stream, this one ends with `data: [DONE]`, as OpenAI's does. Only the chosen token's
log prob is returned (`top_logprobs` is null)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server.errors import ApiError, ClientGone, GenerationError
from server.generation import Job, token_entries
from server.schemas import OpenAICompletionRequest, openai_prompt, parse_body, sampling_params_openai
from server.sse import CLIENT_CLOSED, open_stream, sse
from server.state import ServedEngine, ServerState

PATHS = ("/v1/completions", "/v1/models")
DONE = b"data: [DONE]\n\n"


class _LogProbs:
    """Accumulates the legacy completions `logprobs` object: tokens, their log probs, text offsets."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.text_offset: list[int] = []
        self._offset = 0

    def add(self, out: Any) -> None:
        for text, lp in token_entries(out):
            self.tokens.append(text)
            self.token_logprobs.append(lp)
            self.text_offset.append(self._offset)
            self._offset += len(text)

    def since(self, start: int) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": None, "text_offset": self.text_offset[start:]}


def _usage(job: Job) -> dict:
    return {"prompt_tokens": job.num_prompt_tokens, "completion_tokens": job.num_completion_tokens,
            "total_tokens": job.num_prompt_tokens + job.num_completion_tokens}


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def list_models() -> dict:
        state.require_ready()
        return {"object": "list", "data": [_model(name, engine) for name, engine in state.engines.items()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict:
        return _model(name, state.engine(name))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(await request.body(), OpenAICompletionRequest)
        state.engine(req.model)
        prompt, params = openai_prompt(req), sampling_params_openai(req)
        job = state.start_job(request, req.model, prompt, params)
        head = {"id": f"cmpl-{job.request_id.replace('-', '')}", "object": "text_completion",
                "created": int(time.time()), "model": req.model}
        want_log_probs = params.return_token_log_probs
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            frames = _stream(job, head, want_log_probs, include_usage)
            return await open_stream(job, state, frames) or Response(status_code=CLIENT_CLOSED)
        log_probs, text = _LogProbs(), []
        try:
            async for out in job.outputs():
                text.append(out.text)
                log_probs.add(out)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except GenerationError as e:
            raise ApiError(e.status, e.message) from None
        finally:
            state.finish_job(job)
        choice = {"index": 0, "text": "".join(text), "finish_reason": out.finish_reason,
                  "logprobs": log_probs.since(0) if want_log_probs else None}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(job), "system_fingerprint": None})


def _model(name: str, engine: ServedEngine) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmengine",
            "max_model_len": engine.max_model_len}


async def _stream(job: Job, head: dict, want_log_probs: bool, include_usage: bool) -> AsyncIterator[bytes]:
    log_probs, sent = _LogProbs(), False
    try:
        async for out in job.outputs():
            start = len(log_probs.tokens)
            log_probs.add(out)
            if not out.text and not out.finished and not (want_log_probs and out.token_ids):
                continue
            choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason if out.finished else None,
                      "logprobs": log_probs.since(start) if want_log_probs else None}
            yield sse({**head, "choices": [choice]})
            sent = True
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(job)})
    except ClientGone:
        return
    except GenerationError as e:
        if not sent:
            raise
        yield sse({"error": {"message": e.message, "type": "server_error", "code": e.status}})
    yield DONE
