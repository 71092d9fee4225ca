"""A fake streaming server for the serving benchmark's tests: canned tokens at a fixed pace, no model.

It answers /readyz, the LLM Engine stream route (one `data:` event per token, the last one finished), its sync
route (one answer after all the tokens) and the OpenAI completions stream (a chunk per token, a usage chunk,
`[DONE]`), each token `TOKEN_SECONDS` apart.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

TOKEN_SECONDS = 0.005
PROMPT_TOKENS = 7


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def create_app() -> FastAPI:
    app = FastAPI()
    app.state.bodies = []
    app.state.streaming = 0  # streams being sent now, and the most at once
    app.state.max_streaming = 0

    async def paced(n: int, event):
        """`event(i)` for i = 1..n, TOKEN_SECONDS apart, counted as one stream in flight."""
        app.state.streaming += 1
        app.state.max_streaming = max(app.state.max_streaming, app.state.streaming)
        try:
            for i in range(1, n + 1):
                await asyncio.sleep(TOKEN_SECONDS)
                yield event(i)
        finally:
            app.state.streaming -= 1

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    async def llm_engine_body(request: Request) -> tuple[dict, JSONResponse | None]:
        """The request's JSON (recorded), and a 404 unless it names the model "fake"."""
        body = await request.json()
        app.state.bodies.append(body)
        if request.query_params.get("model_endpoint_name") != "fake":
            return body, JSONResponse({"detail": "no such model"}, status_code=404)
        return body, None

    @app.post("/v1/llm/completions-stream")
    async def llm_stream(request: Request):
        body, refused = await llm_engine_body(request)
        if refused:
            return refused

        n = body["max_new_tokens"]
        events = paced(n, lambda i: _event({"request_id": "r", "output": {
            "text": f" w{i}", "finished": i == n, "num_prompt_tokens": PROMPT_TOKENS, "num_completion_tokens": i,
            "token": None}, "error": None}))
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/v1/llm/completions-sync")
    async def llm_sync(request: Request):
        body, refused = await llm_engine_body(request)
        if refused:
            return refused
        n = body["max_new_tokens"]
        await asyncio.sleep(n * TOKEN_SECONDS)
        return {"request_id": "r", "output": {"text": " w" * n, "num_prompt_tokens": PROMPT_TOKENS,
                                              "num_completion_tokens": n, "tokens": None}}

    @app.post("/v1/completions")
    async def openai_stream(request: Request):
        body = await request.json()
        app.state.bodies.append(body)

        async def events():
            n = body["max_tokens"]
            async for chunk in paced(n, lambda i: _event({"id": "c", "object": "text_completion",
                                                          "choices": [{"index": 0, "text": f" w{i}"}]})):
                yield chunk
            yield _event({"id": "c", "choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class FakeServer:
    def __init__(self) -> None:
        self.app = create_app()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


if __name__ == "__main__":  # as a process, for --launch: fake_sse_server.py --port P [--model NAME]
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake")
    known, _ = parser.parse_known_args()  # ignores the real server's options (--threads, ...)
    uvicorn.run(create_app(), host="127.0.0.1", port=known.port, log_level="warning")
