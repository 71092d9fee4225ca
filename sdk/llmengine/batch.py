"""Batch completions, as the official client's ``Completion.batch_create``, ``get_batch_completion`` and
``cancel_batch_completion`` (``Completion`` exposes these three under those names).

The job runs inside the server on a served model; ``input_data_path`` and ``output_data_path`` are files
under the server's batch directory (``llmengine serve --batch-dir``; relative paths are taken under it).
The output is a JSON list of ``{text, num_prompt_tokens, num_completion_tokens, tokens}``, in prompt order.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pydantic

from . import http_client
from .data_types import (
    BatchCompletionsJob,
    CreateBatchCompletionsModelConfig,
    CreateBatchCompletionsRequestContent,
    CreateBatchCompletionsV1Response,
)
from .errors import ResponseFormatError, ValidationError
from .params import check_timeout

HTTP_TIMEOUT: float = 60  # as the official client's batch calls
V1_ROUTE = "v1/llm/batch-completions"
V2_ROUTE = "v2/batch-completions"


def as_body(value: Any) -> Any:
    """A request model, or a dict of the same shape, as JSON data."""
    return value.model_dump(mode="json") if isinstance(value, pydantic.BaseModel) else value


def _parse(model_type: type[pydantic.BaseModel], payload: Any) -> Any:
    try:
        return model_type.model_validate(payload)
    except pydantic.ValidationError as exc:
        raise ResponseFormatError(f"invalid {model_type.__name__}: {exc}") from exc


def batch_create(
    output_data_path: str,
    model_config: CreateBatchCompletionsModelConfig | dict[str, Any],
    content: CreateBatchCompletionsRequestContent | dict[str, Any] | None = None,
    input_data_path: str | None = None,
    data_parallelism: int = 1,
    max_runtime_sec: int = 24 * 3600,
    labels: dict[str, str] | None = None,
    priority: str | None = None,
    use_v2: bool = False,
    tool_config: Any = None,
    request_headers: dict[str, str] | None = None,
    *,
    timeout: float | None = HTTP_TIMEOUT,
    **kwargs: Any,
) -> CreateBatchCompletionsV1Response | BatchCompletionsJob:
    """Start a batch job: prompts from ``content`` or from the JSON file ``input_data_path``, completions
    written to ``output_data_path``. Returns ``{job_id}``, or with ``use_v2=True`` the job itself.

    Args:
        output_data_path: the output file, under the server's batch directory.
        model_config: ``CreateBatchCompletionsModelConfig(model=NAME)``, NAME a served model.
        content: ``CreateBatchCompletionsRequestContent(prompts=[...], max_new_tokens=..., temperature=...)``.
        input_data_path: a JSON file of the same shape as ``content``, under the batch directory.
        max_runtime_sec: the job fails after this many seconds.
        use_v2: post to ``v2/batch-completions`` and get the job object back.
        data_parallelism, labels, priority, tool_config: sent as the official client sends them (the
            server ignores the first three on one machine and refuses ``tool_config``).
        timeout: seconds to wait for the server's answer (the job itself runs on).
    """
    check_timeout(timeout)
    if (content is None) == (input_data_path is None):
        raise ValidationError("content", "give either content or input_data_path (exactly one)")
    model = as_body(model_config)
    body = {"output_data_path": output_data_path, "input_data_path": input_data_path,
            "content": as_body(content), "model_config": model, "data_parallelism": data_parallelism,
            "max_runtime_sec": max_runtime_sec, "tool_config": as_body(tool_config),
            "labels": labels or (model.get("labels") if isinstance(model, dict) else None) or {},
            "priority": priority, **kwargs}
    payload = http_client.request_json("POST", V2_ROUTE if use_v2 else V1_ROUTE, body=body, timeout=timeout,
                                       headers=request_headers)
    return _parse(BatchCompletionsJob if use_v2 else CreateBatchCompletionsV1Response, payload)


def get_batch_completion(job_id: str, request_headers: dict[str, str] | None = None, *,
                         timeout: float | None = HTTP_TIMEOUT) -> dict[str, Any]:
    """``{"job": {...}}``: the job's status (queued, running, completed, failed, cancelled), progress
    (``{completed, total}`` prompts) and error. A job the server does not know (it restarted, or the id
    is wrong) raises :class:`~llmengine.errors.NotFoundError`."""
    check_timeout(timeout)
    return http_client.request_json("GET", f"{V2_ROUTE}/{quote(job_id, safe='')}", timeout=timeout,
                                    headers=request_headers)


def cancel_batch_completion(job_id: str, request_headers: dict[str, str] | None = None, *,
                            timeout: float | None = HTTP_TIMEOUT) -> dict[str, Any]:
    """``{"success": bool, "status": ...}``: stops a queued or running job (its prompts are aborted in the
    engine at once); ``success`` is False for a job that had already finished."""
    check_timeout(timeout)
    return http_client.request_json("POST", f"{V2_ROUTE}/{quote(job_id, safe='')}/actions/cancel", body={},
                                    timeout=timeout, headers=request_headers)
