"""What the OpenAI-compatible routes share, and `GET /v1/models`: enough for the `openai` Python client,
`OpenAI(base_url="http://127.0.0.1:5005/v1", api_key=KEY)`. Completions live in completions_api.py, chat
completions in chat_api.py.

Unlike the LLM Engine stream, these streams end with `data: [DONE]`, as OpenAI's do, and every error under
these paths carries OpenAI's `{"error": {"message", "type", "code"}}` object beside `detail`
(`is_openai_path`). Model entries carry vLLM's `root` (the model's folder) and `parent` (null) beside OpenAI's
fields.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI

from llmengine_runtime.server.errors import ClientGone, GenerationError
from llmengine_runtime.server.sse import sse
from llmengine_runtime.server.state import ServedEngine, ServerState

DONE = b"data: [DONE]\n\n"


def is_openai_path(path: str) -> bool:
    """Paths whose errors carry OpenAI's error object: all of /v1/ (the openai client's base URL, so an
    unknown route there too) except LLM Engine's /v1/llm/, LLM Engine's OpenAI-style /v2/, and vLLM's
    /tokenize and /detokenize."""
    return (path.startswith(("/v1/", "/v2/")) and not path.startswith("/v1/llm/")) \
        or path in ("/tokenize", "/detokenize")


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


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def list_models() -> dict:
        state.require_ready()
        return {"object": "list", "data": [_model(name, engine) for name, engine in state.engines.items()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict:
        return _model(name, state.engine(name))


def _model(name: str, engine: ServedEngine) -> dict:
    """A model entry: OpenAI's fields, and vLLM's root (what the model was loaded from) and parent (a base model
    for an adapter; none here)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmengine",
            "root": str(getattr(engine, "model_dir", None) or name), "parent": None,
            "max_model_len": engine.max_model_len}
