"""A FAKE LLM Engine server, for testing the SDK only: canned outputs, no model.

It speaks the wire protocol of docs/architecture.md (routes, bodies, SSE chunks, error shapes) and
records every request it sees. The model name picks the behaviour:

- ``echo``: a deterministic completion made of ``PIECES`` (at most ``max_new_tokens`` of them);
- ``status-NNN``: answers HTTP NNN with ``{"detail": ...}`` before anything is streamed;
- ``slow``: waits ``SLOW_SECONDS`` before answering (timeout tests);
- ``quirky`` (stream): CRLF line ends, ``: ping`` comments, ``data:`` without a space, ``event:``/``id:``
  lines, one JSON split over two ``data:`` lines, a UTF-8 character split across network writes,
  and a ``[DONE]`` sentinel followed by junk that a client must never read;
- ``midstream-error`` (stream): one chunk, then an error chunk, then the connection closes;
- anything else: 404.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

PIECES = ["I", " scream", ",", " you", " scream"]
SLOW_SECONDS = 3.0
REQUEST_ID = "fake-request-1"
ENDPOINT = {
    "id": "end_fake",
    "name": "echo",
    "model_name": "echo",
    "source": "hugging_face",
    "status": "READY",
    "inference_framework": "fake",
    "inference_framework_tag": "0",
    "num_shards": 1,
    "quantize": None,
    "spec": None,
    "chat_template_override": None,
    "max_model_len": 2048,  # a field the SDK does not know: must be kept, not rejected
}


def _stream_chunk(text: str, finished: bool, n: int, token: dict[str, Any] | None) -> dict[str, Any]:
    output = {"text": text, "finished": finished, "num_prompt_tokens": 3, "num_completion_tokens": n,
              "token": token}
    return {"request_id": REQUEST_ID, "output": output, "error": None}


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


class FakeLLMEngineServer:
    """Runs the fake app with uvicorn in a background thread on a free 127.0.0.1 port."""

    def __init__(self) -> None:
        self.hits: list[dict[str, Any]] = []  # method, path, query, headers of every request
        self.bodies: list[dict[str, Any]] = []  # JSON bodies of completion requests
        router = APIRouter()
        router.add_api_route("/v1/llm/completions-sync", self._sync, methods=["POST"])
        router.add_api_route("/v1/llm/completions-stream", self._stream, methods=["POST"])
        router.add_api_route("/v1/llm/model-endpoints", self._list, methods=["GET"])
        router.add_api_route("/v1/llm/model-endpoints/{name}", self._get, methods=["GET"])
        app = FastAPI()
        app.include_router(router)
        app.include_router(router, prefix="/llm-engine")  # for base paths with a last segment
        self.app = app
        config = uvicorn.Config(self._record, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off", interface="asgi3", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.url = ""

    async def _record(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.hits.append({
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "headers": {k.decode().lower(): v.decode() for k, v in scope["headers"]},
            })
        await self.app(scope, receive, send)

    def start(self) -> FakeLLMEngineServer:
        self._thread.start()
        for _ in range(500):
            if self._server.started:
                break
            threading.Event().wait(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    def reset(self) -> None:
        self.hits.clear()
        self.bodies.clear()

    # ---- routes -------------------------------------------------------------------------------

    async def _begin(self, request: Request) -> tuple[str, dict[str, Any], JSONResponse | None]:
        """Record the body; return (model, body, early error response or None)."""
        body = await request.json()
        self.bodies.append(body)
        model = request.query_params.get("model_endpoint_name", "")
        if model.startswith("status-"):
            status = int(model.removeprefix("status-"))
            detail: Any = f"fake error {status}"
            if status == 422:
                detail = [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]
            return model, body, JSONResponse({"detail": detail}, status_code=status)
        if model == "slow":
            await asyncio.sleep(SLOW_SECONDS)
        elif model not in ("echo", "quirky", "midstream-error"):
            return model, body, JSONResponse({"detail": f"model {model!r} not found"}, status_code=404)
        return model, body, None

    async def _sync(self, request: Request) -> Any:
        model, body, error = await self._begin(request)
        if error is not None:
            return error
        pieces = PIECES[: body["max_new_tokens"]]
        tokens = None
        if body["return_token_log_probs"]:
            tokens = [{"token": p, "log_prob": -0.5 * i} for i, p in enumerate(pieces)]
        output = {"text": "".join(pieces), "num_prompt_tokens": 3, "num_completion_tokens": len(pieces),
                  "tokens": tokens}
        return {"request_id": REQUEST_ID, "output": output}

    async def _stream(self, request: Request) -> Any:
        model, body, error = await self._begin(request)
        if error is not None:
            return error
        if model == "quirky":
            return StreamingResponse(self._quirky(), media_type="text/event-stream")
        if model == "midstream-error":
            return StreamingResponse(self._midstream_error(), media_type="text/event-stream")
        return StreamingResponse(self._echo(body), media_type="text/event-stream")

    async def _echo(self, body: dict[str, Any]):
        pieces = PIECES[: body["max_new_tokens"]]
        for i, piece in enumerate(pieces):
            token = {"token": piece, "log_prob": -0.5 * i} if body["return_token_log_probs"] else None
            yield _event(_stream_chunk(piece, i == len(pieces) - 1, i + 1, token))

    async def _quirky(self):
        first = json.dumps(_stream_chunk("Don", False, 1, None))
        second = json.dumps(_stream_chunk("\u2019t", True, 2, None), ensure_ascii=False).encode()
        cut = second.index("\u2019".encode()) + 1  # inside the 3-byte character
        yield b": ping\r\n\r\n"
        yield b"event: message\r\nid: 1\r\n"
        split = first.index(' "output"')  # between two JSON members, so "\n" joins them validly
        yield ("data:" + first[:split] + "\r\ndata:" + first[split:] + "\r\n\r\n").encode()
        await asyncio.sleep(0.02)
        yield b": keep-alive\r\n\r\ndata:" + second[:cut]
        await asyncio.sleep(0.02)
        yield second[cut:] + b"\r\n\r\n"
        yield b"data: [DONE]\r\n\r\n"
        yield b"data: {this is not json and must never be parsed}\r\n\r\n"

    async def _midstream_error(self):
        yield _event(_stream_chunk("I", False, 1, None))
        error = {"status_code": 500, "content": {"error": "fake engine crashed", "timestamp": "2024-01-01"}}
        yield _event({"request_id": REQUEST_ID, "output": None, "error": error})

    async def _list(self) -> Any:
        return {"model_endpoints": [ENDPOINT]}

    async def _get(self, name: str) -> Any:
        if name != ENDPOINT["name"]:
            return JSONResponse({"detail": f"model {name!r} not found"}, status_code=404)
        return ENDPOINT
