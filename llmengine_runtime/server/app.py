"""The FastAPI app over engines given by injection: the middleware (auth, body limit, request ids), error
handlers, health, readiness and Prometheus metrics. The routes live beside it: the LLM Engine API in
llm_engine_api.py, the OpenAI-compatible one in openai_api.py and chat_api.py (docs/architecture.md, "Wire
protocol").

    app = create_app({"smollm2-135m-instruct": AsyncEngine(path)}, api_key=None)

`engines` may also be a function returning that dict: it then runs in a thread at startup, so the port opens
at once and /readyz answers 503 until the models are loaded. The app starts the engines in its lifespan and
shuts them down at its end.
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from llmengine_runtime.server import (
    batch_api,
    chat_api,
    completions_api,
    llm_engine_api,
    model_endpoints,
    openai_api,
    playground,
    tokenize_api,
    unsupported_api,
)
from llmengine_runtime.server.errors import ApiError
from llmengine_runtime.server.middleware import Gatekeeper
from llmengine_runtime.server.state import EngineSource, ServerState
from llmengine_runtime.server.tools import TOOL_PARSERS


def create_app(engines: EngineSource, *, api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = 1_000_000, batch_dir: Path | None = None, models_dir: Path | None = None,
               engine_factory: model_endpoints.EngineFactory | None = None,
               tool_call_parser: str | None = None) -> FastAPI:
    """`batch_dir`: where batch jobs read and write (default ~/.cache/llmengine/batch); `models_dir`: where
    `POST /v1/llm/model-endpoints` may load checkpoints from (default the local models folder);
    `engine_factory(name, folder, max_model_len)` builds those engines (default a runtime.AsyncEngine);
    `tool_call_parser` ("hermes") serves chat's tool_choice "auto" (server/tools.py)."""
    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser={tool_call_parser!r}: accepted {', '.join(TOOL_PARSERS)}")
    state = ServerState(engines, max_queue=max_queue, tool_call_parser=tool_call_parser)

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
        app.state.batch.cancel_all()  # jobs live in memory: a restart loses them
        await asyncio.to_thread(state.shutdown_engines)

    app = FastAPI(title="llmengine", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(Gatekeeper, api_key=api_key, max_body_bytes=max_body_bytes, metrics=state.metrics,
                       routes=lambda: app.router.routes)

    def error(request: Request, status: int, detail: Any, headers: dict | None = None) -> JSONResponse:
        body: dict[str, Any] = {"detail": detail, "request_id": request.state.request_id}
        if openai_api.is_openai_path(request.url.path):  # the openai client reads error.message
            message = detail if isinstance(detail, str) else json.dumps(detail)
            body["error"] = openai_api.error_object(status, message)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error(request, e.status, e.detail)

    @app.exception_handler(HTTPException)  # Starlette's: no such route (404), wrong method (405)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        detail = e.detail
        if e.status_code in (404, 405) and detail == HTTPStatus(e.status_code).phrase:  # the router's own
            detail = f"{detail}: no route {request.method} {request.url.path}"
        return error(request, e.status_code, detail, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return error(request, 400, problems)

    # ---- health and metrics -------------------------------------------------------------------------------
    @app.get("/healthcheck")
    @app.get("/healthz")
    async def health() -> JSONResponse:
        """Alive: 200 while this process can serve (loading included); 503 once an engine has stopped for good
        (a tensor-parallel worker died or hung), so that an orchestrator restarts it."""
        if failures := state.failures():
            return JSONResponse({"status": "failed", "detail": "; ".join(
                f"{name} stopped: {reason}" for name, reason in failures.items())}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        failures = state.failures() if state.ready else {}
        if state.ready and not state.draining and not failures:
            return JSONResponse({"status": "ready", "models": list(state.engines)})
        detail = ("shutting down" if state.draining else
                  f"the models failed to load: {state.load_error}" if state.load_error else
                  "; ".join(f"{name} stopped: {reason}" for name, reason in failures.items()) if failures else
                  "loading models")
        return JSONResponse({"detail": detail}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    llm_engine_api.add_routes(app, state)
    openai_api.add_routes(app, state)
    completions_api.add_routes(app, state)
    chat_api.add_routes(app, state)
    tokenize_api.add_routes(app, state)  # vLLM's /tokenize, /detokenize, /health, /ping, /version
    model_endpoints.add_routes(app, state, models_dir, engine_factory)
    batch_api.add_routes(app, state, batch_dir)
    unsupported_api.add_routes(app)
    playground.add_routes(app, state)  # GET /: the playground page
    return app
