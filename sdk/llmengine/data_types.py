"""Response models (pydantic v2) for completions, model endpoints and batch jobs; request models for batch jobs.

``.dict()`` and ``.json()`` give the shapes the LLM Engine docs print, e.g. a sync response
``{"request_id": ..., "outputs": [{"text": ..., "num_prompt_tokens": ..., "num_completion_tokens": ...}],
"traceback": null}`` and a stream chunk ``{"request_id": ..., "output": {"text": ..., "finished": ...,
"num_prompt_tokens": ..., "num_completion_tokens": ...}, "traceback": null}``. Optional detail that the
docs never show (``tokens``, ``token``, ``error``) appears only when set, and the sync response's
single ``output`` (the current client's spelling, always ``outputs[0]``) is left out of them as a
duplicate. ``model_dump()`` / ``model_dump_json()`` still give every field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

JSONDict = dict[str, Any]


def _plain(value: Any) -> Any:
    """Recursively turn models into the plain data ``.dict()`` returns."""
    if isinstance(value, _Response):
        return value.dict()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Response(BaseModel):
    """Base of the SDK's models: unknown fields ignored, pydantic-v1 style ``dict()``/``json()``."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    _omit_if_none: ClassVar[tuple[str, ...]] = ()
    """Fields left out of ``dict()``, ``json()`` and ``repr()`` while they are ``None``."""
    _not_in_dict: ClassVar[tuple[str, ...]] = ()
    """Fields that ``dict()`` and ``json()`` never show (duplicates of another field)."""

    def dict(self) -> JSONDict:  # type: ignore[override]
        """Plain data in the documented shape (see the module docstring)."""
        out: JSONDict = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in self._not_in_dict or (value is None and name in self._omit_if_none):
                continue
            out[name] = _plain(value)
        for name, value in (self.model_extra or {}).items():
            out[name] = _plain(value)
        return out

    def json(self, **dumps_kwargs: Any) -> str:  # type: ignore[override]
        """``json.dumps`` of :meth:`dict`; keyword arguments go to ``json.dumps``."""
        dumps_kwargs.setdefault("ensure_ascii", False)
        return json.dumps(self.dict(), **dumps_kwargs)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if value is None and name in self._omit_if_none:
                continue
            yield name, value


class TokenOutput(_Response):
    """One generated token and its log probability."""

    token: str
    log_prob: float


class CompletionOutput(_Response):
    """The completion of a sync request."""

    _omit_if_none = ("tokens",)

    text: str
    num_prompt_tokens: int | None = None
    num_completion_tokens: int | None = None
    tokens: list[TokenOutput] | None = None
    """Per-token detail, present when ``return_token_log_probs=True``."""


class CompletionSyncV1Response(_Response):
    """Answer to a sync completion: ``outputs`` (the docs' list) and ``output`` (``outputs[0]``)."""

    _not_in_dict = ("output",)

    request_id: str | None = None
    outputs: list[CompletionOutput] = []
    output: CompletionOutput | None = None
    traceback: str | None = None

    @model_validator(mode="after")
    def _fill_both_shapes(self) -> CompletionSyncV1Response:
        if self.output is None and self.outputs:
            self.output = self.outputs[0]
        elif self.output is not None and not self.outputs:
            self.outputs = [self.output]
        return self


class CompletionStreamOutput(_Response):
    """One streamed piece of a completion."""

    _omit_if_none = ("token",)

    text: str
    finished: bool
    num_prompt_tokens: int | None = None
    num_completion_tokens: int | None = None
    token: TokenOutput | None = None


class StreamErrorContent(_Response):
    """What went wrong after streaming had started."""

    model_config = ConfigDict(extra="allow")

    error: str
    timestamp: str | None = None


class StreamError(_Response):
    """Error chunk of a stream: the status the request would have had, and the content."""

    status_code: int
    content: StreamErrorContent | str


class CompletionStreamV1Response(_Response):
    """One chunk of a streamed completion: ``output`` or, if the server failed mid-stream, ``error``."""

    _omit_if_none = ("error",)

    request_id: str | None = None
    output: CompletionStreamOutput | None = None
    error: StreamError | None = None
    traceback: str | None = None


class GetLLMEndpointResponse(_Response):
    """A served model (``GET v1/llm/model-endpoints/{name}``); unknown fields are kept."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    name: str
    model_name: str | None = None
    source: str | None = None
    status: str | None = None
    inference_framework: str | None = None
    inference_framework_tag: str | None = None
    num_shards: int | None = None
    quantize: str | None = None
    spec: Any = None
    chat_template_override: str | None = None


class ListLLMEndpointsResponse(_Response):
    """``GET v1/llm/model-endpoints``: every served model."""

    model_config = ConfigDict(extra="allow")

    model_endpoints: list[GetLLMEndpointResponse]


# The current official client's names for the same shapes.
CompletionSyncResponse = CompletionSyncV1Response
CompletionStreamResponse = CompletionStreamV1Response


# ---- batch jobs and run-time models (the official client's names) ----------------------------------------
# Request models check their bounds when built (pydantic.ValidationError), as the official client's do. A
# job's ``model_config`` is a pydantic reserved name: read it as ``job.dict()["model_config"]``.

class CreateBatchCompletionsModelConfig(BaseModel):
    """``model_config`` of a batch job: the served model to run it on (``model``). Other vLLM settings
    are accepted and sent as given."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    checkpoint_path: str | None = None
    labels: dict[str, str] = {}
    num_shards: int | None = Field(default=1, ge=1)
    max_context_length: int | None = Field(default=None, ge=1)
    seed: int | None = None


class CreateBatchCompletionsRequestContent(BaseModel):
    """The prompts of a batch job and their sampling parameters (also the shape of an input file)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str]
    max_new_tokens: int
    temperature: float = Field(ge=0.0, le=1.0)
    stop_sequences: list[str] | None = None
    return_token_log_probs: bool | None = False
    presence_penalty: float | None = Field(default=None, ge=0.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=0.0, le=2.0)
    top_k: int | None = Field(default=None, ge=-1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    skip_special_tokens: bool | None = True


class CreateBatchCompletionsV1Response(_Response):
    job_id: str


class BatchCompletionProgress(_Response):
    completed: int
    total: int


class BatchCompletionsJob(_Response):
    """A batch job (``use_v2=True``): status is queued, running, completed, failed or cancelled."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    job_id: str
    input_data_path: str | None = None
    output_data_path: str
    status: str
    created_at: str
    expires_at: str
    completed_at: str | None = None
    priority: str | None = None
    metadata: dict[str, str] | None = None
    progress: BatchCompletionProgress | None = None
    error: str | None = None


class CreateLLMEndpointResponse(_Response):
    endpoint_creation_task_id: str


class DeleteLLMEndpointResponse(_Response):
    deleted: bool


CreateBatchCompletionsV1RequestContent = CreateBatchCompletionsRequestContent
CreateBatchCompletionsV1ModelConfig = CreateBatchCompletionsModelConfig
CreateBatchCompletionsResponse = CreateBatchCompletionsV1Response
CreateBatchCompletionsV2Response = BatchCompletionsJob
