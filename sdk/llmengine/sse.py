"""Server-sent events: turn a stream of text lines into the ``data`` payload of each event.

Follows the event-stream format: a blank line ends an event; lines starting with ``:`` are
comments (keep-alives); ``data:value`` and ``data: value`` are the same field; several ``data``
lines in one event join with ``\\n``; other fields (``event``, ``id``, ``retry``) are ignored.
A ``[DONE]`` payload (OpenAI style) ends the stream. An event cut off by the connection closing
without its blank line is still delivered, as the official client reads each data line eagerly.
Line splitting (``\\n``, ``\\r\\n``, ``\\r``) is done by the caller, e.g. ``httpx``'s ``iter_lines``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

DONE = "[DONE]"


class SSEDecoder:
    """Feed lines one at a time; :meth:`feed` returns an event's data when a line completes one."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Consume one line (without its terminator); return the finished event's data, if any."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """End the current event; return its data, or ``None`` if it had no data lines."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """Yield each event's data from ``lines``, stopping at ``[DONE]``."""
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data is not None:
            if data.strip() == DONE:
                return
            yield data
    data = decoder.flush()
    if data is not None and data.strip() != DONE:
        yield data


async def aiter_sse_data(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    """Async twin of :func:`iter_sse_data`."""
    decoder = SSEDecoder()
    async for line in lines:
        data = decoder.feed(line)
        if data is not None:
            if data.strip() == DONE:
                return
            yield data
    data = decoder.flush()
    if data is not None and data.strip() != DONE:
        yield data
