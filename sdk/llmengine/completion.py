"""``Completion.create`` / ``Completion.acreate``: text completions, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pydantic

from . import batch, http_client
from .api_engine import COMPLETION_TIMEOUT
from .data_types import CompletionStreamV1Response, CompletionSyncV1Response
from .errors import ResponseFormatError
from .params import check_timeout, completion_body, resolve_model

SYNC_ROUTE = "v1/llm/completions-sync"
STREAM_ROUTE = "v1/llm/completions-stream"


def _parse_chunk(data: str) -> CompletionStreamV1Response:
    try:
        return CompletionStreamV1Response.model_validate_json(data)
    except pydantic.ValidationError as exc:
        raise ResponseFormatError(f"invalid stream chunk {data[:200]!r}: {exc}") from exc


def _parse_sync(payload: Any) -> CompletionSyncV1Response:
    try:
        return CompletionSyncV1Response.model_validate(payload)
    except pydantic.ValidationError as exc:
        raise ResponseFormatError(f"invalid completion response {str(payload)[:200]!r}: {exc}") from exc


class Completion:
    """Generate text with a served model.

    ``create`` blocks; ``acreate`` is its ``asyncio`` twin with the same parameters. With
    ``stream=False`` they return a :class:`CompletionSyncV1Response`; with ``stream=True``,
    ``create`` returns an iterator and ``await acreate(...)`` an async iterator of
    :class:`CompletionStreamV1Response` chunks. Parameters are checked before anything is sent
    (:class:`~llmengine.errors.ValidationError`); a stream sends its request when first iterated,
    so HTTP errors surface there. If the server fails after a stream has started, the last chunk
    carries ``error`` (and ``output=None``) instead of an exception being raised, as in the
    official client; check ``chunk.error``. ``batch_create``, ``get_batch_completion`` and
    ``cancel_batch_completion`` run batch jobs in the server (:mod:`llmengine.batch`).

    Args:
        model: name of the model endpoint (``model_name=`` is the same, the older docs' spelling).
        prompt: text to complete.
        max_new_tokens: most tokens to generate, >= 1.
        temperature: sampling temperature in [0, 1]; 0 is greedy.
        stop_sequences: strings that end the completion.
        return_token_log_probs: also return each token with its log probability.
        presence_penalty, frequency_penalty: in [0, 2].
        top_k: >= 1, or -1 for all tokens.  top_p: in (0, 1].
        include_stop_str_in_output: keep the matched stop sequence in the text.
        guided_json, guided_regex, guided_choice, guided_grammar: guided decoding, at most one: the output
            follows a JSON schema (a dict), matches a regex in full, is exactly one of a list of strings, or
            follows a Lark (or GBNF) grammar. The server answers 400 naming the problem in an invalid one.
        timeout: seconds to wait for the server (for a stream, between chunks); default 300, as the
            current official client; None waits forever.
        stream: stream the completion as it is generated.
        request_headers: extra HTTP headers for this request.
    """

    @classmethod
    def create(
        cls,
        model: str | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 20,
        temperature: float = 0.2,
        stop_sequences: list[str] | None = None,
        return_token_log_probs: bool | None = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        include_stop_str_in_output: bool | None = None,
        guided_json: dict[str, Any] | None = None,
        guided_regex: str | None = None,
        guided_choice: list[str] | None = None,
        guided_grammar: str | None = None,
        *,
        timeout: float | None = COMPLETION_TIMEOUT,
        stream: bool = False,
        request_headers: dict[str, str] | None = None,
        model_name: str | None = None,
    ) -> CompletionSyncV1Response | Iterator[CompletionStreamV1Response]:
        """Complete ``prompt`` (see the class docstring for the parameters)."""
        name = resolve_model(model, model_name)
        check_timeout(timeout)
        body = completion_body(prompt, max_new_tokens, temperature, stop_sequences, return_token_log_probs,
                               presence_penalty, frequency_penalty, top_k, top_p, include_stop_str_in_output,
                               guided_json, guided_regex, guided_choice, guided_grammar)
        params = {"model_endpoint_name": name}
        if stream:
            return cls._stream(params, body, timeout, request_headers)
        payload = http_client.request_json("POST", SYNC_ROUTE, body=body, params=params, timeout=timeout,
                                           headers=request_headers)
        return _parse_sync(payload)

    @classmethod
    async def acreate(
        cls,
        model: str | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 20,
        temperature: float = 0.2,
        stop_sequences: list[str] | None = None,
        return_token_log_probs: bool | None = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        include_stop_str_in_output: bool | None = None,
        guided_json: dict[str, Any] | None = None,
        guided_regex: str | None = None,
        guided_choice: list[str] | None = None,
        guided_grammar: str | None = None,
        *,
        timeout: float | None = COMPLETION_TIMEOUT,
        stream: bool = False,
        request_headers: dict[str, str] | None = None,
        model_name: str | None = None,
    ) -> CompletionSyncV1Response | AsyncIterator[CompletionStreamV1Response]:
        """Async :meth:`create`: ``await`` it; with ``stream=True`` iterate the result with ``async for``."""
        name = resolve_model(model, model_name)
        check_timeout(timeout)
        body = completion_body(prompt, max_new_tokens, temperature, stop_sequences, return_token_log_probs,
                               presence_penalty, frequency_penalty, top_k, top_p, include_stop_str_in_output,
                               guided_json, guided_regex, guided_choice, guided_grammar)
        params = {"model_endpoint_name": name}
        if stream:
            return cls._astream(params, body, timeout, request_headers)
        payload = await http_client.arequest_json("POST", SYNC_ROUTE, body=body, params=params,
                                                  timeout=timeout, headers=request_headers)
        return _parse_sync(payload)

    # Batch jobs (llmengine/batch.py), under the official client's names.
    batch_create = staticmethod(batch.batch_create)
    get_batch_completion = staticmethod(batch.get_batch_completion)
    cancel_batch_completion = staticmethod(batch.cancel_batch_completion)

    @staticmethod
    def _stream(params: dict[str, str], body: dict[str, Any], timeout: float | None,
                headers: dict[str, str] | None) -> Iterator[CompletionStreamV1Response]:
        for data in http_client.stream_events(STREAM_ROUTE, body=body, params=params, timeout=timeout,
                                              headers=headers):
            if data.strip():  # an empty event is a keep-alive, not a chunk
                yield _parse_chunk(data)

    @staticmethod
    async def _astream(params: dict[str, str], body: dict[str, Any], timeout: float | None,
                       headers: dict[str, str] | None) -> AsyncIterator[CompletionStreamV1Response]:
        async for data in http_client.astream_events(STREAM_ROUTE, body=body, params=params, timeout=timeout,
                                                     headers=headers):
            if data.strip():  # an empty event is a keep-alive, not a chunk
                yield _parse_chunk(data)
