"""What the app holds between requests: the engines, readiness, admission (the queue limit) and the
jobs in flight, which shutdown drains."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from server.errors import ApiError, GenerationError
from server.generation import SHUTDOWN_ERROR, Job
from server.metrics import Metrics

log = logging.getLogger("llmengine.server")

EngineSource = dict[str, Any] | Callable[[], dict[str, Any]]


class ServerState:
    def __init__(self, source: EngineSource, *, max_queue: int) -> None:
        self.source = source
        self.engines: dict[str, Any] = {}
        self.ready = False
        self.load_error: str | None = None
        self.draining = False
        self.max_queue = max_queue
        self.jobs: set[Job] = set()
        self.metrics = Metrics(lambda: self.engines)

    # ---- loading -------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Build (if given a factory) and start the engines; blocking, run in a thread."""
        try:
            engines = self.source() if callable(self.source) else dict(self.source)
            for engine in engines.values():
                engine.start()
            self.engines = engines
            self.ready = True
        except Exception as e:
            log.exception("loading the models failed")
            self.load_error = f"{type(e).__name__}: {e}"

    def shutdown_engines(self, timeout: float = 5.0) -> None:
        for engine in self.engines.values():
            engine.shutdown(timeout)

    def require_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "the models are still loading" if not self.load_error
                           else f"the models failed to load: {self.load_error}")

    def engine(self, name: str | None) -> Any:
        """The engine serving `name`, or ApiError (503 still loading, 400 no name, 404 unknown)."""
        self.require_ready()
        if not name:
            raise ApiError(400, "model_endpoint_name query parameter is required")
        if name not in self.engines:
            raise ApiError(404, f"model {name!r} is not served here; served models: {', '.join(self.engines)}")
        return self.engines[name]

    # ---- admission and jobs --------------------------------------------------------------------------------
    def start_job(self, request: Request, model: str, prompt: str | list[int], params: Any) -> Job:
        """Admit a request (or 429/503 at once) and hand it to the engine; the caller must `finish_job`."""
        engine = self.engines[model]
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        if len(self.jobs) >= self.max_queue:
            raise ApiError(429, f"too many requests in flight ({len(self.jobs)}, the limit is {self.max_queue}); "
                                "retry later")
        request_id = request.state.request_id
        try:
            outputs = engine.add_request(prompt, params, request_id=request_id)
        except ValueError as e:  # too long for the context, empty prompt, ...
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:  # the engine is shutting down
            raise ApiError(503, str(e)) from None
        job = Job(engine, request_id, outputs, request.receive, self.metrics.token_observer(model))
        self.jobs.add(job)
        self.metrics.in_flight.set(len(self.jobs))
        return job

    def finish_job(self, job: Job) -> None:
        job.close()
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


class EventStream(StreamingResponse):
    """Server-sent events from an async iterator of ready-made `data: ...\\n\\n` frames. Unlike Starlette's,
    it never reads `receive` (the job's watcher does) and always runs `on_close`, however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(frames, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await self.stream_response(send)
        except OSError:
            pass  # the client went away mid-send: the job is closed below
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.on_close()


async def open_stream(job: Job, state: ServerState, frames: AsyncIterator[bytes]) -> EventStream | None:
    """Wait for the first frame before sending headers, so a request that fails before producing anything
    gets a real status code (raised as ApiError); None when the client left first."""
    try:
        first = await frames.__anext__()
    except GenerationError as e:
        state.finish_job(job)
        raise ApiError(e.status, e.message) from None
    except StopAsyncIteration:  # the client left before the first frame
        state.finish_job(job)
        return None
    except BaseException:
        state.finish_job(job)
        raise

    async def all_frames() -> AsyncIterator[bytes]:
        try:
            yield first
            async for frame in frames:
                yield frame
        finally:
            await frames.aclose()

    return EventStream(all_frames(), lambda: state.finish_job(job))
