"""The LLM Engine Completion API (docs/architecture.md, "Wire protocol"): `POST /v1/llm/completions-sync`
and `/v1/llm/completions-stream?model_endpoint_name=NAME`. The model endpoints are in model_endpoints.py,
batch completions in batch_api.py.

The stream sends one event per generated token and ends by closing the connection, without OpenAI's
`data: [DONE]` (the official client fails on it). An error after the first event is sent as an error chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.server.errors import ApiError, ClientGone, GenerationError
from llmengine_runtime.server.generation import Job, token_entries
from llmengine_runtime.server.schemas import CompletionV1Request, parse_body, sampling_params_v1
from llmengine_runtime.server.sse import CLIENT_CLOSED, open_stream, sse
from llmengine_runtime.server.state import ServerState


def error_payload(request_id: str, e: GenerationError) -> dict:
    timestamp = datetime.now(timezone.utc).isoformat()
    return {"request_id": request_id, "output": None,
            "error": {"status_code": e.status, "content": {"error": e.message, "timestamp": timestamp}}}


async def stream_frames(job: Job, want_log_probs: bool) -> AsyncIterator[bytes]:
    """One event per generated token; deltas without text are skipped (unless log probs are asked for), but
    the finished one is always sent. GenerationError escapes only before the first event."""
    sent = False
    try:
        async for out in job.outputs():
            if not out.text and not out.finished and not (want_log_probs and out.token_ids):
                continue
            token = None
            if want_log_probs and out.token_ids:
                token = {"token": out.text, "log_prob": token_entries(out)[-1][1]}
            yield sse({"request_id": job.request_id, "output": {
                "text": out.text, "finished": out.finished, "num_prompt_tokens": out.num_prompt_tokens,
                "num_completion_tokens": out.num_completion_tokens, "token": token}, "error": None})
            sent = True
    except ClientGone:
        return
    except GenerationError as e:
        if not sent:
            raise
        yield sse(error_payload(job.request_id, e))


def add_routes(app: FastAPI, state: ServerState) -> None:
    async def admit(request: Request, stream: bool) -> tuple[Job, SamplingParams]:
        name = request.query_params.get("model_endpoint_name")
        state.engine(name)
        req = parse_body(await request.body(), CompletionV1Request)
        params = sampling_params_v1(req)
        return state.start_job(request, name, req.prompt, params, stream=stream), params

    @app.post("/v1/llm/completions-sync")
    async def completions_sync(request: Request) -> Response:
        job, params = await admit(request, stream=False)
        text: list[str] = []
        tokens: list[tuple[str, float]] = []
        try:
            async for out in job.outputs():
                text.append(out.text)
                tokens.extend(token_entries(out))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except GenerationError as e:
            raise ApiError(e.status, e.message) from None
        finally:
            state.finish_job(job)
        token_list = [{"token": t, "log_prob": lp} for t, lp in tokens] if params.return_token_log_probs else None
        return JSONResponse({"request_id": job.request_id, "output": {
            "text": "".join(text), "num_prompt_tokens": job.num_prompt_tokens,
            "num_completion_tokens": job.num_completion_tokens, "tokens": token_list}})

    @app.post("/v1/llm/completions-stream")
    async def completions_stream(request: Request) -> Response:
        job, params = await admit(request, stream=True)
        stream = await open_stream(job, state, stream_frames(job, params.return_token_log_probs))
        return stream or Response(status_code=CLIENT_CLOSED)
