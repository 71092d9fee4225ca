"""Typed errors: HTTP statuses, timeouts, refused connections, and parameter checks before sending."""

import asyncio
import math
import socket
import time

import pytest
from llmengine import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    BadRequestError,
    Completion,
    LLMEngineError,
    Model,
    NotFoundError,
    RateLimitExceededError,
    ServerError,
    UnauthorizedError,
    UnknownError,
    ValidationError,
    api_engine,
)

STATUS_ERRORS = [
    (400, BadRequestError),
    (401, UnauthorizedError),
    (404, NotFoundError),
    (422, UnknownError),
    (429, RateLimitExceededError),
    (500, ServerError),
    (503, ServerError),
]


def _check(exc: APIError, status: int, cls: type) -> None:
    assert type(exc) is cls
    assert isinstance(exc, LLMEngineError)
    assert exc.status_code == status
    if status == 422:
        assert exc.detail[0]["loc"] == ["body", "prompt"]
    else:
        assert exc.detail == f"fake error {status}"
        assert f"fake error {status}" in str(exc)


@pytest.mark.parametrize(("status", "cls"), STATUS_ERRORS)
def test_status_maps_to_typed_error_sync_and_stream(fake, status, cls):
    with pytest.raises(cls) as sync_info:
        Completion.create(model=f"status-{status}", prompt="p")
    _check(sync_info.value, status, cls)
    stream = Completion.create(model=f"status-{status}", prompt="p", stream=True)
    with pytest.raises(cls) as stream_info:
        next(stream)
    _check(stream_info.value, status, cls)


@pytest.mark.parametrize(("status", "cls"), STATUS_ERRORS)
def test_status_maps_to_typed_error_async(fake, status, cls):
    async def sync_call():
        await Completion.acreate(model=f"status-{status}", prompt="p")

    async def stream_call():
        stream = await Completion.acreate(model=f"status-{status}", prompt="p", stream=True)
        async for _ in stream:
            pass

    for call in (sync_call, stream_call):
        with pytest.raises(cls) as info:
            asyncio.run(call())
        _check(info.value, status, cls)


def test_unknown_model_is_not_found(fake):
    with pytest.raises(NotFoundError, match="nope"):
        Completion.create(model="nope", prompt="p")


def _timed(fn) -> float:
    start = time.monotonic()
    with pytest.raises(APITimeoutError) as info:
        fn()
    elapsed = time.monotonic() - start
    assert isinstance(info.value, APIConnectionError)
    assert "timed out after 0.3 s" in str(info.value)
    return elapsed


@pytest.mark.slow
def test_timeout_is_honoured_sync_stream_and_async(fake):
    assert _timed(lambda: Completion.create(model="slow", prompt="p", timeout=0.3)) < 1.5
    assert _timed(lambda: list(Completion.create(model="slow", prompt="p", timeout=0.3, stream=True))) < 1.5

    async def async_stream():
        stream = await Completion.acreate(model="slow", prompt="p", timeout=0.3, stream=True)
        return [c async for c in stream]

    assert _timed(lambda: asyncio.run(Completion.acreate(model="slow", prompt="p", timeout=0.3))) < 1.5
    assert _timed(lambda: asyncio.run(async_stream())) < 1.5


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # closed again: nothing listens there


def test_connection_refused_names_the_url(fake):
    url = _refused_url()
    api_engine.set_base_path(url)
    calls = [
        lambda: Completion.create(model="echo", prompt="p"),
        lambda: list(Completion.create(model="echo", prompt="p", stream=True)),
        lambda: asyncio.run(Completion.acreate(model="echo", prompt="p")),
        lambda: Model.list(),
    ]
    for call in calls:
        with pytest.raises(APIConnectionError) as info:
            call()
        assert not isinstance(info.value, APITimeoutError)
        assert url in str(info.value)


BAD_PARAMS = [
    ({"temperature": -0.1}, "temperature", "[0, 1]"),
    ({"temperature": 1.5}, "temperature", "[0, 1]"),
    ({"temperature": math.nan}, "temperature", "[0, 1]"),
    ({"temperature": "hot"}, "temperature", "[0, 1]"),
    ({"presence_penalty": -0.5}, "presence_penalty", "[0, 2]"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[0, 2]"),
    ({"frequency_penalty": 3}, "frequency_penalty", "[0, 2]"),
    ({"top_k": 0}, "top_k", ">= 1, or -1"),
    ({"top_k": -2}, "top_k", ">= 1, or -1"),
    ({"top_k": 2.5}, "top_k", ">= 1, or -1"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_p": 1.01}, "top_p", "(0, 1]"),
    ({"max_new_tokens": 0}, "max_new_tokens", ">= 1"),
    ({"max_new_tokens": 2.0}, "max_new_tokens", ">= 1"),
    ({"max_new_tokens": True}, "max_new_tokens", ">= 1"),
    ({"stop_sequences": [1]}, "stop_sequences", "list of strings"),
    ({"return_token_log_probs": "yes"}, "return_token_log_probs", "True, False"),
    ({"prompt": None}, "prompt", "string"),
    ({"model": None}, "model", "required"),
    ({"model_name": "echo"}, "model", "not both"),
    ({"timeout": 0}, "timeout", "positive"),
]


@pytest.mark.parametrize(("kwargs", "param", "accepted"), BAD_PARAMS)
def test_bad_parameters_raise_before_any_request(fake, kwargs, param, accepted):
    call = {"model": "echo", "prompt": "p", **kwargs}
    for stream in (False, True):
        with pytest.raises(ValidationError) as info:
            Completion.create(**call, stream=stream)  # raises at the call, even for a stream
        assert isinstance(info.value, ValueError) and isinstance(info.value, LLMEngineError)
        assert info.value.param == param
        assert str(info.value).startswith(f"{param}:") and accepted in str(info.value)
        with pytest.raises(ValidationError):
            asyncio.run(Completion.acreate(**call, stream=stream))
    assert fake.hits == []


def test_boundary_values_are_accepted(fake):
    for kwargs in ({"temperature": 0, "top_k": -1, "top_p": 1.0}, {"temperature": 1},
                   {"presence_penalty": 0, "frequency_penalty": 2}, {"top_k": 1, "max_new_tokens": 1},
                   {"stop_sequences": "\n"}, {"timeout": None}):
        Completion.create(model="echo", prompt="p", **kwargs)
    assert len(fake.bodies) == 6
    assert fake.bodies[4]["stop_sequences"] == ["\n"]


def test_error_hierarchy():
    for cls in (BadRequestError, UnauthorizedError, NotFoundError, RateLimitExceededError, ServerError,
                UnknownError):
        assert issubclass(cls, APIError) and issubclass(cls, LLMEngineError)
    for cls in (APIConnectionError, APITimeoutError, ValidationError):
        assert issubclass(cls, LLMEngineError)


def test_default_timeouts_are_the_official_clients(fake, monkeypatch):
    """Completions wait 300 s by default (a long generation on a busy server takes minutes), as the current
    official client does; listing and describing endpoints wait 10 s."""
    from llmengine import http_client

    seen: list[float | None] = []
    options = http_client._client_options
    monkeypatch.setattr(http_client, "_client_options", lambda timeout: seen.append(timeout) or options(timeout))

    Completion.create(model="echo", prompt="p")
    list(Completion.create(model="echo", prompt="p", stream=True))
    asyncio.run(Completion.acreate(model="echo", prompt="p"))
    Model.list()
    assert seen == [300, 300, 300, 10]
    assert api_engine.COMPLETION_TIMEOUT == 300 and api_engine.DEFAULT_TIMEOUT == 10
