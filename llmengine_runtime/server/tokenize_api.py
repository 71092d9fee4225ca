"""vLLM's utility routes beside our own: `POST /tokenize` and `POST /detokenize` (as vLLM's, with the same bodies
and answers), `GET /health`, `GET|POST /ping` (SageMaker's) and `GET /version`.

    POST /tokenize   {"prompt": "Hello", "add_special_tokens": true, "return_token_strs": false}
                  or {"messages": [...], "add_generation_prompt": true, ...}   (through the chat template)
                  -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize {"tokens": [...]} -> {"prompt": text}

`model` may be left out when one model is served. The bodies follow the same rule as the OpenAI routes'
(field_policy.py): unknown fields are refused, never ignored.
"""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmengine_runtime.server.chat_api import chat_prompt, chat_template
from llmengine_runtime.server.chat_schemas import REFUSED_CHAT, ChatTemplateFields
from llmengine_runtime.server.errors import bad_request
from llmengine_runtime.server.field_policy import NO_EFFECT_COMMON, OpenAIBody
from llmengine_runtime.server.schemas import parse_body
from llmengine_runtime.server.state import ServedEngine, ServerState
from llmengine_runtime.server.tools import plan_tools


class TokenizePromptRequest(OpenAIBody):
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(ChatTemplateFields):
    REFUSED: ClassVar[dict[str, tuple[list[Any], str]]] = {"chat_template": REFUSED_CHAT["chat_template"]}
    NO_EFFECT: ClassVar[dict[str, str]] = {
        "mm_processor_kwargs": "only text is accepted: there is no media to process"}

    model: str | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(OpenAIBody):
    NO_EFFECT: ClassVar[dict[str, str]] = NO_EFFECT_COMMON

    model: str | None = None
    tokens: list[int]


def version() -> str:
    try:
        return metadata.version("llmengine-runtime")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def _tokenizer(engine: ServedEngine, model: str) -> Any:
    if engine.tokenizer is None:
        raise bad_request(f"model {model!r} has no tokenizer (tokenizer.json or tokenizer.model)")
    return engine.tokenizer


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            chat = "messages" in json.loads(raw)  # the chat form (parse_body says what is wrong with a bad body)
        except (ValueError, TypeError):
            chat = False
        req = parse_body(raw, TokenizeChatRequest if chat else TokenizePromptRequest)
        model = state.model_name(req.model)
        engine = state.engine(model)
        tokenizer = _tokenizer(engine, model)
        if chat:
            plan = plan_tools(req.tools, "none", None, chat_template(engine, model), None)
            tokens = chat_prompt(engine, model, req, plan.tools)
        else:
            tokens = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        strs = [tokenizer.decode([t], skip_special_tokens=False) for t in tokens] if req.return_token_strs else None
        return JSONResponse({"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens,
                             "token_strs": strs})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = parse_body(await request.body(), DetokenizeRequest)
        model = state.model_name(req.model)
        engine = state.engine(model)
        tokenizer = _tokenizer(engine, model)
        vocab = getattr(tokenizer, "vocab_size", None)
        outside = [t for t in req.tokens if t < 0 or (vocab is not None and t >= vocab)]
        if outside:
            raise bad_request(f"tokens {outside[:5]} are outside the vocabulary [0, {vocab})")
        return JSONResponse({"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)})

    @app.get("/health")
    async def health() -> Response:
        """vLLM's: 200 with no body while the engines can serve; 503 once one has stopped for good."""
        failures = state.failures()
        if failures:
            return JSONResponse({"detail": "; ".join(f"{n} stopped: {r}" for n, r in failures.items())},
                                status_code=503)
        return Response(status_code=200)

    @app.get("/ping")
    @app.post("/ping")
    async def ping() -> Response:
        """SageMaker's health check (vLLM serves it): as /health."""
        return await health()

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": version()}
