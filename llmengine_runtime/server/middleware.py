"""The ASGI layer in front of every route: request id, auth, body size limit, request counting.

The request id is the client's `X-Request-Id` header when it sends one (as vLLM), else a fresh UUID; a route may
replace it (vLLM's `request_id` body field: `use_request_id`). The response's `x-request-id` header says it.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers streams and hides disconnects).
The body is read here, up to the limit, and replayed to the route; after it, `receive` is the server's own
again, so a route still sees the client's disconnect.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from starlette.routing import Match

from llmengine_runtime.server.errors import ApiError
from llmengine_runtime.server.logs import RefusalLog
from llmengine_runtime.server.openai_api import error_object, is_openai_path

# "/": the playground page (its API calls need the key); /health, /ping and /version: vLLM's, open as there
OPEN_PATHS = {"/healthcheck", "/healthz", "/readyz", "/", "/health", "/ping", "/version"}
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: it goes into headers, logs and engine ids
REQUEST_ID_RULE = "accepted 1 to 128 visible ASCII characters (no spaces)"


def use_request_id(request: Any, request_id: str | None) -> None:
    """Make a body's `request_id` (vLLM's field) the request's id; 400 if it is not a usable id."""
    if request_id is None:
        return
    if not REQUEST_ID.fullmatch(request_id):
        raise ApiError(400, f"request_id={request_id[:40]!r} is not a usable id: {REQUEST_ID_RULE}")
    request.state.request_id = request_id


def presented_keys(headers: dict[bytes, bytes]) -> list[bytes]:
    """Every API key the request offers: x-api-key, Bearer token, HTTP Basic user name."""
    keys = []
    if b"x-api-key" in headers:
        keys.append(headers[b"x-api-key"])
    scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
    value = value.strip()
    if scheme.lower() == b"bearer" and value:
        keys.append(value)
    elif scheme.lower() == b"basic" and value:
        try:
            keys.append(base64.b64decode(value, validate=True).partition(b":")[0])
        except ValueError:
            pass
    return keys


def key_matches(keys: list[bytes], api_key: bytes) -> bool:
    # compare every candidate in constant time; `|` (not `any`) so the time does not say which matched
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(key, api_key)
    return ok


async def send_json(send: Callable, status: int, body: dict, headers: list | None = None,
                    path: str = "") -> None:
    if is_openai_path(path):  # the openai client reads error.message
        body = {**body, "error": error_object(status, body["detail"])}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class Gatekeeper:
    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: Any,
                 routes: Callable[[], list]) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.routes = routes

    def _route_label(self, scope: dict) -> str:
        for route in self.routes():
            if route.matches(scope)[0] == Match.FULL:
                return route.path
        return "unmatched"  # never the raw path: a scanner must not blow up the label set

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id")
        request_id = given.decode("latin-1") if given is not None else str(uuid.uuid4())
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = [500]
        refusal = RefusalLog(scope, request_id)  # logs why a 4xx was given, whoever gave it

        async def send_with_id(message: dict) -> None:
            refusal.see(message)
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                id_header = (b"x-request-id", state["request_id"].encode("latin-1"))  # a route may replace it
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        try:
            if given is not None and not REQUEST_ID.fullmatch(request_id):
                state["request_id"] = request_id = str(uuid.uuid4())
                await send_json(send_with_id, 400, {"detail": f"x-request-id header: {REQUEST_ID_RULE}",
                                                    "request_id": request_id}, path=scope["path"])
                return
            await self._guarded(scope, receive, send_with_id, request_id)
        finally:
            self.metrics.requests.labels(self._route_label(scope), str(status[0])).inc()

    async def _guarded(self, scope: dict, receive: Callable, send: Callable, request_id: str) -> None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS \
                and not key_matches(presented_keys(headers), self.api_key):
            detail = "missing or invalid API key (HTTP Basic user name, Bearer token or x-api-key)"
            await send_json(send, 401, {"detail": detail, "request_id": request_id},
                            [(b"www-authenticate", b'Basic realm="llmengine"')], scope["path"])
            return
        too_big = {"detail": f"request body too large: the limit is {self.max_body_bytes} bytes",
                   "request_id": request_id}
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await send_json(send, 413 if length.isdigit() else 400,
                            too_big if length.isdigit() else {"detail": "bad Content-Length"}, path=scope["path"])
            return
        # read the body here, counting, so a chunked upload cannot exceed the limit either
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await send_json(send, 413, too_big, path=scope["path"])
                return
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send)
