"""HTTP transport over httpx: one short-lived client per call, errors turned into the SDK's.

Every call gets the base URL and auth from :mod:`llmengine.api_engine` at call time. ``timeout``
bounds connecting and each wait for data (for a stream: the gap between chunks), as httpx does.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from . import api_engine
from .errors import APIConnectionError, APITimeoutError, ResponseFormatError, error_from_response
from .sse import aiter_sse_data, iter_sse_data

_ssl_context: ssl.SSLContext | None = None


def _client_options(timeout: float | None) -> dict[str, Any]:
    # Building an SSL context costs ~20 ms; build it once, on first use (never at import).
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = httpx.create_ssl_context()
    return {"timeout": httpx.Timeout(timeout), "verify": _ssl_context}


def _headers(extra: dict[str, str] | None) -> dict[str, str]:
    headers = api_engine.auth_headers()
    headers.update(extra or {})
    return headers


@contextmanager
def _transport_errors(url: str, timeout: float | None) -> Iterator[None]:
    """Re-raise httpx's network errors as :class:`APITimeoutError` / :class:`APIConnectionError`."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(url, timeout) from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(url, str(exc) or type(exc).__name__) from exc


def _json_body(response: httpx.Response) -> Any:
    if response.status_code != 200:
        raise error_from_response(response.status_code, response.content)
    try:
        return response.json()
    except ValueError as exc:
        raise ResponseFormatError(f"{response.url} answered 200 with a body that is not JSON: "
                                  f"{response.text[:200]!r}") from exc


def request_json(
    method: str,
    resource: str,
    *,
    timeout: float | None,
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    """Send one request and return the decoded JSON of its 200 answer."""
    url = api_engine.url_for(resource)
    with _transport_errors(url, timeout), httpx.Client(**_client_options(timeout)) as client:
        response = client.request(method, url, json=body, params=params, headers=_headers(headers))
    return _json_body(response)


async def arequest_json(
    method: str,
    resource: str,
    *,
    timeout: float | None,
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    """Async twin of :func:`request_json`."""
    url = api_engine.url_for(resource)
    with _transport_errors(url, timeout):
        async with httpx.AsyncClient(**_client_options(timeout)) as client:
            response = await client.request(method, url, json=body, params=params, headers=_headers(headers))
    return _json_body(response)


def stream_events(
    resource: str,
    *,
    timeout: float | None,
    body: dict[str, Any],
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Iterator[str]:
    """POST ``body`` and yield the data of each server-sent event of the 200 answer."""
    url = api_engine.url_for(resource)
    with (
        _transport_errors(url, timeout),
        httpx.Client(**_client_options(timeout)) as client,
        client.stream("POST", url, json=body, params=params, headers=_headers(headers)) as response,
    ):
        if response.status_code != 200:
            raise error_from_response(response.status_code, response.read())
        yield from iter_sse_data(response.iter_lines())


async def astream_events(
    resource: str,
    *,
    timeout: float | None,
    body: dict[str, Any],
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[str]:
    """Async twin of :func:`stream_events`."""
    url = api_engine.url_for(resource)
    with _transport_errors(url, timeout):
        async with (
            httpx.AsyncClient(**_client_options(timeout)) as client,
            client.stream("POST", url, json=body, params=params, headers=_headers(headers)) as response,
        ):
            if response.status_code != 200:
                raise error_from_response(response.status_code, await response.aread())
            async for data in aiter_sse_data(response.aiter_lines()):
                yield data
