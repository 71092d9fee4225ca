"""`GET /`: the playground, one self-contained HTML page (server/static/playground.html, inline CSS and JS) that
talks to this server's own OpenAI-compatible routes: a chat view (`POST /v1/chat/completions`) and a raw
completion view (`POST /v1/completions`), both streamed, with a model picker (`GET /v1/models`), sampling
controls, a live tokens/s figure and a stop button that aborts the request (the server sees the disconnect
and frees the request's KV blocks).

The page itself needs no API key (the middleware leaves `/` open); the API calls it makes send the key typed
into it as `Authorization: Bearer KEY`. Its Content-Security-Policy lets it reach only this origin.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from llmengine_runtime.server.errors import ApiError
from llmengine_runtime.server.state import ServerState

PAGE = Path(__file__).parent / "static" / "playground.html"

# Inline script and style are the page itself; every fetch, image, font or frame must come from this origin.
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
}


@lru_cache(maxsize=1)
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        try:
            html = page()
        except OSError as e:  # an install that left the page out: say so instead of a bare 500
            raise ApiError(500, f"the playground page is missing from this install ({PAGE}): {e.strerror}") from None
        return HTMLResponse(html, headers=HEADERS)
