"""What the app holds between requests: the engines, readiness, admission (the queue limit) and the
jobs in flight, which shutdown drains; and `ServedEngine`, what the server needs from an engine."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import Request

from llmengine_runtime.models.tokenizer import Tokenizer
from llmengine_runtime.runtime import RequestOutput, SamplingParams
from llmengine_runtime.server import logs
from llmengine_runtime.server.errors import ApiError
from llmengine_runtime.server.generation import SHUTDOWN_ERROR, Job
from llmengine_runtime.server.metrics import Metrics

log = logging.getLogger("llmengine.server")


class ServedEngine(Protocol):
    """What the server needs from an engine: runtime.AsyncEngine, or the tests' fake engine."""

    name: str
    max_model_len: int
    tokenizer: Tokenizer | None  # None: the model folder has no tokenizer (prompts must be token ids)

    def start(self) -> None: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    deadline: float | None = None, stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Validate now (ValueError naming what is wrong; RuntimeError once shut down), then stream deltas
        (stream=False: the deltas may come merged, down to one when the request finishes)."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for /metrics: blocks_used, blocks_free, num_waiting, num_running, ..."""
        ...

    def failure(self) -> str | None:
        """Why the engine can serve no more (a tensor-parallel worker died or hung), or None; /readyz then fails."""
        ...


EngineSource = dict[str, ServedEngine] | Callable[[], dict[str, ServedEngine]]


class ServerState:
    def __init__(self, source: EngineSource, *, max_queue: int, tool_call_parser: str | None = None) -> None:
        self.source = source
        self.tool_call_parser = tool_call_parser  # "hermes": tool_choice "auto" reads tool calls out of answers
        self.engines: dict[str, ServedEngine] = {}
        self.ready = False
        self.load_error: str | None = None
        self.draining = False
        self.max_queue = max_queue
        self.jobs: set[Job] = set()
        self.metrics = Metrics(lambda: self.engines)
        self._engines_lock = threading.Lock()  # add_engine/remove_engine replace the dict, never mutate it

    # ---- loading -------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Build (if given a factory) and start the engines; blocking, run in a thread."""
        started = time.perf_counter()
        try:
            engines = self.source() if callable(self.source) else dict(self.source)
            for engine in engines.values():
                engine.start()
            self.engines = engines
            self.ready = True
            logs.models_ready(list(engines), time.perf_counter() - started)
        except (LookupError, ValueError, OSError) as e:  # a missing or unusable model: the message says it all
            log.error("loading the models failed: %s", e)
            self.load_error = f"{type(e).__name__}: {e}"
        except Exception as e:
            log.exception("loading the models failed")
            self.load_error = f"{type(e).__name__}: {e}"

    def shutdown_engines(self, timeout: float = 5.0) -> None:
        for engine in self.engines.values():
            engine.shutdown(timeout)

    def add_engine(self, name: str, engine: ServedEngine) -> None:
        """Serve a started engine under `name` from now on (a model loaded at run time); ValueError if the
        name is taken or the server is shutting down. Copy-on-write: a reader iterating `engines` keeps its
        snapshot."""
        with self._engines_lock:
            if self.draining:
                raise ValueError("the server is shutting down")
            if name in self.engines:
                raise ValueError(f"model {name!r} is already served")
            self.engines = {**self.engines, name: engine}

    def remove_engine(self, name: str) -> ServedEngine | None:
        """Stop routing requests to `name`; returns its engine (the caller shuts it down), or None."""
        with self._engines_lock:
            engines = dict(self.engines)
            engine = engines.pop(name, None)
            self.engines = engines
        return engine

    def failures(self) -> dict[str, str]:
        """The served engines that can serve no more, and why."""
        return {name: reason for name, engine in self.engines.items() if (reason := engine.failure()) is not None}

    def require_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "the models are still loading" if not self.load_error
                           else f"the models failed to load: {self.load_error}")

    def model_name(self, name: str | None) -> str:
        """The model an OpenAI-style request names, or the one served when it names none (as vLLM); 400 when it
        names none and several are served."""
        self.require_ready()
        engines = self.engines
        if name:
            return name
        if len(engines) == 1:
            return next(iter(engines))
        raise ApiError(400, f"model is required: this server serves {len(engines)} models ({', '.join(engines)})")

    def engine(self, name: str | None) -> ServedEngine:
        """The engine serving `name`, or ApiError (503 still loading, 400 no name, 404 unknown)."""
        self.require_ready()
        if not name:
            raise ApiError(400, "model_endpoint_name query parameter is required")
        engines = self.engines  # one snapshot: models are added and removed at run time
        if name not in engines:
            raise ApiError(404, f"model {name!r} is not served here; served models: {', '.join(engines)}")
        return engines[name]

    # ---- admission and jobs --------------------------------------------------------------------------------
    def start_job(self, request: Request, model: str, prompt: str | list[int], params: SamplingParams, *,
                  request_id: str | None = None, receive: Callable | None = None, stream: bool = True) -> Job:
        """Admit a request (or 429/503 at once) and hand it to the engine; the caller must `finish_job`.
        `request_id` and `receive` default to the HTTP request's (several engine requests for one HTTP
        request, as OpenAI's `n`, give their own). stream=False: a sync response needs only the end result."""
        engine = self.engine(model)  # 404 if it was unloaded meanwhile
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        if len(self.jobs) >= self.max_queue:
            raise ApiError(429, f"too many requests in flight ({len(self.jobs)}, the limit is {self.max_queue}); "
                                "retry later")
        request_id = request_id or request.state.request_id
        try:
            outputs = engine.add_request(prompt, params, request_id=request_id, stream=stream)
        except ValueError as e:  # too long for the context, empty prompt, ...
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:  # the engine is shutting down
            raise ApiError(503, str(e)) from None
        job = Job(engine, request_id, outputs, receive or request.receive, self.metrics.token_observer(model),
                  model=model)
        self.jobs.add(job)
        self.metrics.in_flight.set(len(self.jobs))
        return job

    def finish_job(self, job: Job) -> None:
        job.close()
        if job in self.jobs:  # once per engine request (a choice group closes its jobs through here too)
            logs.request_finished(job)
            self.metrics.request_finished(job)
        self.jobs.discard(job)
        self.metrics.in_flight.set(len(self.jobs))

    async def drain(self, grace: float) -> None:
        """Refuse new requests, let those in flight finish for `grace` seconds, then end the rest with an
        error (streams get an error chunk), and wait briefly for them to be sent."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job in list(self.jobs):
            job.interrupt(SHUTDOWN_ERROR)
        deadline = time.monotonic() + 2.0
        while self.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
