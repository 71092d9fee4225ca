"""What the server writes to its log beside uvicorn's access lines, on the logger "llmengine.server":

- why each 4xx was given: `400 POST /v1/completions: temperature: must be in [0, 2] (request 1f3e...)`;
- one line per finished engine request: `request 1f3e... smollm2: 12 prompt + 32 completion tokens,
  TTFT 61 ms, 27.4 tok/s, finish length` (tok/s: the completion tokens after the first, over the time since
  the first; "-" with fewer than two);
- how long each model took to load (and to warm up, with `--compile`), and when all were ready.

`configure()` (called by `llmengine serve`) prints these lines the way uvicorn prints its own (`INFO:     ...`);
without it they go wherever the application's logging sends them (pytest's caplog in the tests).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

log = logging.getLogger("llmengine.server")

DETAIL_LIMIT = 4096  # bytes of a refusal's body read for its detail; JSON error bodies are far smaller
CLIENT_CLOSED = 499  # not a refusal: the client left (the request's summary line says so)


def configure(level: str = "info") -> None:
    """Print the "llmengine" and "runtime" (the engine's: compile warm-up, thread tuner, failures) loggers' records
    on stderr with uvicorn's format; safe to call twice."""
    from uvicorn.logging import DefaultFormatter

    for name in ("llmengine", "runtime"):
        logger = logging.getLogger(name)
        if not any(getattr(h, "llmengine_handler", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
            handler.llmengine_handler = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False  # printed once, here, even if the application configures the root logger


def _detail(body: bytes) -> str:
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip() or "(no body)"
    return detail if isinstance(detail, str) else json.dumps(detail)


class RefusalLog:
    """Watches one request's response as it is sent; for a 4xx, logs the status, the route and the body's
    `detail` once the body is complete. Every refusal (the middleware's and every route's) passes here."""

    def __init__(self, scope: dict, request_id: str) -> None:
        self.route = f"{scope.get('method', '?')} {scope.get('path', '?')}"
        self.request_id = request_id
        self.status = 0
        self.body = bytearray()

    def see(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            return
        if message["type"] != "http.response.body" or not 400 <= self.status < 500 or self.status == CLIENT_CLOSED:
            return
        self.body += message.get("body", b"")[:DETAIL_LIMIT - len(self.body)]
        if not message.get("more_body", False):
            log.info("%d %s: %s (request %s)", self.status, self.route, _detail(bytes(self.body)), self.request_id)


def _seconds(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(end - start, 0.0)


def request_finished(job: Any) -> None:
    """The summary line of a finished (or abandoned) engine request; `job` is a server.generation.Job."""
    ttft = _seconds(job.started, job.first_token_at)
    decode = _seconds(job.first_token_at, job.ended_at)
    n = job.num_completion_tokens
    rate = f"{(n - 1) / decode:.1f}" if n > 1 and decode else "-"
    log.info("request %s %s: %d prompt + %d completion tokens, TTFT %s, %s tok/s, finish %s",
             job.request_id, job.model, job.num_prompt_tokens, n,
             f"{ttft * 1000:.0f} ms" if ttft is not None else "-", rate, job.finish_reason or "-")


def model_loaded(name: str, engine: Any, seconds: float, warmed_up: bool) -> None:
    """`NAME loaded in S s`, with what it runs on and its KV cache, when the engine says."""
    inner = getattr(engine, "engine", engine)  # runtime.AsyncEngine wraps an Engine
    facts = []
    dtype, device = getattr(inner, "dtype", None), getattr(inner, "device", None)
    if dtype is not None and device is not None:
        facts.append(f"{str(dtype).removeprefix('torch.')} on {device}")
    try:
        stats = engine.stats()
        block_size = getattr(getattr(inner, "block_manager", None), "block_size", None)
        kv_dtype = getattr(inner, "kv_cache_dtype", None)  # said when it is not the model's (fp16 on CPU)
        facts.append(f"{stats['blocks_total']} KV blocks" + (f" of {block_size} tokens" if block_size else "")
                     + (f" in {str(kv_dtype).removeprefix('torch.')}" if kv_dtype not in (None, dtype) else ""))
    except Exception:  # an engine without stats: say less
        pass
    facts.append(f"context {engine.max_model_len} tokens")
    if warmed_up:
        facts.append("including the torch.compile warm-up")
    log.info("%s loaded in %.1f s (%s)", name, seconds, ", ".join(facts))


def models_ready(names: list[str], seconds: float) -> None:
    log.info("ready: %s loaded and started in %.1f s", ", ".join(names), seconds)
