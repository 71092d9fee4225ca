"""Errors that become HTTP answers: a status code and a `{"detail": ...}` body."""

from __future__ import annotations


class ApiError(Exception):
    """Raised by a route before anything was sent; the app answers `status` with `{"detail": detail}`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def bad_request(detail: str) -> ApiError:
    return ApiError(400, detail)


class GenerationError(Exception):
    """The engine could not finish a request (shutdown, timeout, engine failure): a status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client closed its connection; nobody is left to answer."""
