"""Exceptions raised by the SDK; every one derives from :class:`LLMEngineError`.

HTTP statuses map as the official LLM Engine client maps them: 400 BadRequestError,
401 UnauthorizedError, 404 NotFoundError, 429 RateLimitExceededError, 5xx ServerError,
anything else that is not exactly 200 (422 included) UnknownError.
"""

from __future__ import annotations

import json


class LLMEngineError(Exception):
    """Base class of every error the SDK raises."""


class ValidationError(LLMEngineError, ValueError):
    """A request parameter is out of range; raised before any request is sent."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class APIConnectionError(LLMEngineError):
    """The server could not be reached, or the connection broke mid-response."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"could not reach LLM Engine at {url}: {reason}")
        self.url = url


class APITimeoutError(APIConnectionError):
    """The server did not answer (or stopped streaming) within the timeout."""

    def __init__(self, url: str, timeout: float | None) -> None:
        LLMEngineError.__init__(self, f"request to {url} timed out after {timeout} s")
        self.url = url
        self.timeout = timeout


class ResponseFormatError(LLMEngineError, ValueError):
    """The server answered 200 with a body the SDK cannot parse."""


class APIError(LLMEngineError):
    """The server answered with a status other than 200; ``detail`` is its ``detail`` field."""

    def __init__(self, status_code: int, detail: object) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class BadRequestError(APIError):
    """HTTP 400: the inputs are invalid; retrying unchanged will fail again."""


class UnauthorizedError(APIError):
    """HTTP 401: no valid API key was sent."""


class NotFoundError(APIError):
    """HTTP 404: no such model endpoint (or route)."""


class RateLimitExceededError(APIError):
    """HTTP 429: too many requests; back off and retry."""


class ServerError(APIError):
    """HTTP 5xx: the server failed."""


class UnknownError(APIError):
    """Any other non-200 status, including 422 (request body rejected by the schema)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    404: NotFoundError,
    429: RateLimitExceededError,
}


def error_from_response(status_code: int, body: bytes) -> APIError:
    """Build the typed error for a non-200 response from its status and raw body."""
    try:
        payload = json.loads(body)
        detail = payload["detail"] if isinstance(payload, dict) and "detail" in payload else payload
    except ValueError:
        detail = body.decode("utf-8", errors="replace")
    if 500 <= status_code < 600:
        return ServerError(status_code, detail)
    return _BY_STATUS.get(status_code, UnknownError)(status_code, detail)
