"""One generation request as the server sees it: engine outputs, the client's connection, and shutdown.

A `Job` pumps the engine's deltas into a queue and, beside it, watches the ASGI `receive` channel for the
client's disconnect; shutdown can interrupt it too. The route reads `job.outputs()` and gets deltas until the
finished one, or an exception: `ClientGone` (abort, nobody to answer) or `GenerationError` (answer it).
Whatever happens, `job.close()` aborts the request in the engine unless it finished, which frees its KV
blocks at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from llmengine_runtime.server.errors import ClientGone, GenerationError

# finish reasons that end a request without a usable answer -> (HTTP status, message)
FAILED = {
    "abort": (503, "the request was aborted by the server"),
    "timeout": (504, "the request timed out"),
    "error": (500, "the engine failed"),
}
SHUTDOWN_ERROR = GenerationError(503, "the server is shutting down")


class Job:
    def __init__(self, engine: Any, request_id: str, outputs: AsyncIterator, receive: Callable,
                 on_token: Callable[[bool, int, float], None] | None = None, model: str = "") -> None:
        self.engine, self.request_id = engine, request_id
        self.model = model or getattr(engine, "name", "")
        self.finished = False
        self.num_prompt_tokens = 0
        self.num_completion_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens the prefix cache held (vLLM's cached_tokens)
        # for the log's summary line (server/logs.py): perf_counter times, and how it ended
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.finish_reason: str | None = None
        self.error: Exception | None = None  # what ended it early: ClientGone, GenerationError
        self._on_token = on_token  # (first?, new tokens, seconds since the previous delta or the arrival)
        self._last = self.started
        self._first = True
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pump_task = asyncio.create_task(self._pump(outputs))
        self._watch_task = asyncio.create_task(self._watch(receive))

    async def _pump(self, outputs: AsyncIterator) -> None:
        try:
            async for out in outputs:
                self._queue.put_nowait(out)
            self._queue.put_nowait(GenerationError(500, "the engine ended the request without finishing it"))
        except Exception as e:  # the engine's own failure, not a cancellation
            self._queue.put_nowait(GenerationError(500, f"engine error: {e}"))

    async def _watch(self, receive: Callable) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.interrupt(ClientGone())

    def interrupt(self, error: Exception) -> None:
        """Make `outputs()` raise `error` next (client gone, server shutting down)."""
        self._queue.put_nowait(error)

    async def outputs(self) -> AsyncIterator[Any]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, Exception):
                self.error = self.error or item
                raise item
            now = time.perf_counter()
            first_at = item.first_token_time  # set on a stream=False request's one output: its first token's time
            if item.token_ids and self.first_token_at is None:
                self.first_token_at = first_at if first_at is not None else now
            self.num_prompt_tokens = item.num_prompt_tokens
            self.num_completion_tokens = item.num_completion_tokens
            self.num_cached_tokens = getattr(item, "num_cached_tokens", 0)
            if item.token_ids and self._on_token:
                if first_at is not None and self._first:  # the first token, then the others
                    self._on_token(True, 1, first_at - self._last)
                    if len(item.token_ids) > 1:
                        self._on_token(False, len(item.token_ids) - 1, now - first_at)
                else:
                    self._on_token(self._first, len(item.token_ids), now - self._last)
                self._last, self._first = now, False
            if item.finished:
                self.finished = True
                self.ended_at, self.finish_reason = now, item.finish_reason
                if item.finish_reason in FAILED:
                    status, message = FAILED[item.finish_reason]
                    raise GenerationError(status, f"{message}: {item.error}" if item.error else message)
            yield item

    def close(self) -> None:
        self._watch_task.cancel()
        if not self.finished:
            self.finished = True
            self.ended_at = time.perf_counter()
            self.finish_reason = ("client disconnected" if isinstance(self.error, ClientGone) else
                                  f"error {self.error.status}" if isinstance(self.error, GenerationError) else
                                  "aborted")
            self.engine.abort(self.request_id)
        self._pump_task.cancel()


def token_entries(out: Any) -> list[tuple[str, float]]:
    """(text, log prob) per token of a delta. A delta's text is credited to its last token (the earlier
    ones completed no character), so joining the token texts gives the output text."""
    n = len(out.token_ids)
    log_probs = list(out.log_probs or [])
    texts = getattr(out, "token_texts", None)  # a merged output (stream=False) keeps each of its deltas' texts
    return [(texts[i] if texts is not None else out.text if i == n - 1 else "",
             float(log_probs[i]) if i < len(log_probs) else 0.0) for i in range(n)]
