"""Server-sent events: the frame format, the streaming response, and how a stream starts.

Both APIs stream one `data: {json}` line per event followed by a blank line (json.dumps escapes every
newline, so an event is always one line). A stream sends its headers only once the first frame is ready,
so a request that fails before producing anything still gets a real status code.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from starlette.responses import StreamingResponse

from llmengine_runtime.server.errors import ApiError, GenerationError

if TYPE_CHECKING:
    from llmengine_runtime.server.generation import Job
    from llmengine_runtime.server.state import ServerState

CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never read by anyone


def sse(payload: dict) -> bytes:
    """One event: a single `data:` line and a blank line."""
    return f"data: {json.dumps(payload)}\n\n".encode()


class EventStream(StreamingResponse):
    """Server-sent events from an async iterator of ready-made frames. Unlike Starlette's, it never reads
    `receive` (the job's watcher does) and always runs `on_close`, however the stream ends."""

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
