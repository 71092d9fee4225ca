"""The FastAPI app: the LLM Engine Completion API (DESIGN.md 4), OpenAI-compatible completions, health,
model listing and Prometheus metrics, over engines given by injection.

    app = create_app({"smollm2-135m-instruct": AsyncEngine(path)}, api_key=None)

`engines` may also be a function returning that dict: it then runs in a thread at startup, so the port opens
at once and /readyz answers 503 until the models are loaded. The app starts the engines in its lifespan and
shuts them down at its end.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from server import openai_api
from server.errors import ApiError, ClientGone, GenerationError
from server.generation import Job, token_entries
from server.middleware import Gatekeeper
from server.schemas import CompletionV1Request, parse_body, sampling_params_v1
from server.state import EngineSource, ServerState, open_stream

CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never read by anyone


def sse(payload: dict) -> bytes:
    """One event: a single `data:` line (json.dumps escapes every newline) and a blank line."""
    return f"data: {json.dumps(payload)}\n\n".encode()


def error_payload(request_id: str, e: GenerationError) -> dict:
    timestamp = datetime.now(timezone.utc).isoformat()
    return {"request_id": request_id, "output": None,
            "error": {"status_code": e.status, "content": {"error": e.message, "timestamp": timestamp}}}


def endpoint_info(name: str, engine: Any) -> dict:
    return {
        "id": f"end_{name}", "name": name, "model_name": name, "source": "hugging_face", "status": "READY",
        # the official client accepts only deepspeed, text_generation_inference, vllm, lightllm or
        # tensorrt_llm here; ours is a vLLM-style engine (paged KV, continuous batching)
        "inference_framework": "vllm", "inference_framework_tag": "llmengine-runtime",
        "num_shards": 1, "quantize": None, "spec": None, "chat_template_override": None,
        "max_model_len": engine.max_model_len,
    }


def create_app(engines: EngineSource, *, api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = 1_000_000) -> FastAPI:
    state = ServerState(engines, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if callable(state.source):
            threading.Thread(target=state.load, name="llmengine-load", daemon=True).start()
        else:
            await asyncio.to_thread(state.load)
            if state.load_error:
                raise RuntimeError(state.load_error)
        yield
        state.draining = True
        await asyncio.to_thread(state.shutdown_engines)

    app = FastAPI(title="llmengine", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(Gatekeeper, api_key=api_key, max_body_bytes=max_body_bytes, metrics=state.metrics,
                       routes=lambda: app.router.routes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        body: dict[str, Any] = {"detail": e.detail, "request_id": request.state.request_id}
        if request.url.path.startswith(openai_api.PATHS):  # the openai client reads error.message
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            body["error"] = {"message": e.detail, "type": kind, "code": e.status}
        return JSONResponse(body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return JSONResponse({"detail": problems}, status_code=400)

    # ---- LLM Engine Completion API ------------------------------------------------------------------------
    async def admit(request: Request) -> tuple[Job, Any]:
        name = request.query_params.get("model_endpoint_name")
        state.engine(name)
        req = parse_body(await request.body(), CompletionV1Request)
        params = sampling_params_v1(req)
        return state.start_job(request, name, req.prompt, params), params

    @app.post("/v1/llm/completions-sync")
    async def completions_sync(request: Request) -> Response:
        job, params = await admit(request)
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

    async def stream_frames(job: Job, want_log_probs: bool) -> AsyncIterator[bytes]:
        """One event per generated token; deltas without text are skipped (unless log probs are asked
        for), but the finished one is always sent. GenerationError escapes only before the first event."""
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

    @app.post("/v1/llm/completions-stream")
    async def completions_stream(request: Request) -> Response:
        job, params = await admit(request)
        stream = await open_stream(job, state, stream_frames(job, params.return_token_log_probs))
        return stream or Response(status_code=CLIENT_CLOSED)

    @app.get("/v1/llm/model-endpoints")
    async def list_endpoints() -> dict:
        state.require_ready()
        return {"model_endpoints": [endpoint_info(n, e) for n, e in state.engines.items()]}

    @app.get("/v1/llm/model-endpoints/{name}")
    async def get_endpoint(name: str) -> dict:
        return endpoint_info(name, state.engine(name))

    # ---- health and metrics -------------------------------------------------------------------------------
    @app.get("/healthcheck")
    @app.get("/healthz")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready", "models": list(state.engines)})
        detail = ("shutting down" if state.draining else
                  f"the models failed to load: {state.load_error}" if state.load_error else "loading models")
        return JSONResponse({"detail": detail}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    openai_api.add_routes(app, state)
    return app
