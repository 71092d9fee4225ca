"""``Model.list`` / ``Model.get``: the model endpoints a server offers; ``Model.create`` / ``Model.delete``:
load a model into the running server (a folder or .gguf file under its ``--models-dir``) and unload it."""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import quote

import pydantic

from . import http_client
from .api_engine import DEFAULT_TIMEOUT
from .data_types import (
    CreateLLMEndpointResponse,
    DeleteLLMEndpointResponse,
    GetLLMEndpointResponse,
    ListLLMEndpointsResponse,
)
from .errors import ResponseFormatError, ValidationError
from .params import check_timeout

ROUTE = "v1/llm/model-endpoints"
_M = TypeVar("_M", bound=pydantic.BaseModel)


class Model:
    """Look up served models; load and unload models at run time (``create``, ``delete``)."""

    @classmethod
    def create(
        cls,
        name: str,
        model: str,
        inference_framework_image_tag: str = "latest",
        source: str = "hugging_face",
        inference_framework: str = "vllm",
        num_shards: int = 1,
        quantize: str | None = None,
        checkpoint_path: str | None = None,
        max_model_len: int | None = None,
        cpus: int | None = None,
        memory: str | None = None,
        storage: str | None = None,
        gpus: int | None = None,
        nodes_per_worker: int = 1,
        min_workers: int = 0,
        max_workers: int = 1,
        per_worker: int = 2,
        endpoint_type: str = "streaming",
        gpu_type: str | None = None,
        high_priority: bool | None = False,
        post_inference_hooks: list[str] | None = None,
        default_callback_url: str | None = None,
        public_inference: bool | None = True,
        labels: dict[str, str] | None = None,
        request_headers: dict[str, str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        **extra_kwargs: Any,
    ) -> CreateLLMEndpointResponse:
        """Load ``checkpoint_path`` (a model folder with config.json and safetensors, or a .gguf file, under
        the server's ``--models-dir``) and serve it as ``name``. Loading runs in the background: poll
        ``Model.get(name).status`` until ``READY`` (``UPDATE_FAILED``, with ``error``, if it failed). The
        arguments are the official client's; hardware and scaling ones mean nothing on one machine."""
        check_timeout(timeout)
        if not isinstance(name, str) or not name:
            raise ValidationError("name", f"a name for the new endpoint is required, got {name!r}")
        body = {"name": name, "model_name": model, "source": source, "inference_framework": inference_framework,
                "inference_framework_image_tag": inference_framework_image_tag, "num_shards": num_shards,
                "quantize": quantize, "checkpoint_path": checkpoint_path, "max_model_len": max_model_len,
                "cpus": cpus, "memory": memory, "storage": storage, "gpus": gpus, "gpu_type": gpu_type,
                "nodes_per_worker": nodes_per_worker, "min_workers": min_workers, "max_workers": max_workers,
                "per_worker": per_worker, "endpoint_type": endpoint_type, "high_priority": high_priority,
                "post_inference_hooks": post_inference_hooks, "default_callback_url": default_callback_url,
                "public_inference": public_inference, "labels": labels or {}, "metadata": {}, **extra_kwargs}
        payload = http_client.request_json("POST", ROUTE, body=body, timeout=timeout, headers=request_headers)
        return _parse(CreateLLMEndpointResponse, payload)

    @classmethod
    def delete(cls, model_endpoint_name: str, request_headers: dict[str, str] | None = None, *,
               timeout: float | None = 30) -> DeleteLLMEndpointResponse:
        """Unload a model loaded with :meth:`create`: ``{"deleted": true}``. Its requests in flight get a few
        seconds to finish, then end with an error."""
        check_timeout(timeout)
        payload = http_client.request_json("DELETE", f"{ROUTE}/{quote(model_endpoint_name, safe='')}",
                                           timeout=timeout, headers=request_headers)
        return _parse(DeleteLLMEndpointResponse, payload)

    @classmethod
    def list(cls, *, timeout: float | None = DEFAULT_TIMEOUT) -> ListLLMEndpointsResponse:
        """Every model endpoint: ``Model.list().model_endpoints``."""
        payload = http_client.request_json("GET", ROUTE, timeout=timeout)
        return _parse(ListLLMEndpointsResponse, payload)

    @classmethod
    def get(cls, model: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> GetLLMEndpointResponse:
        """One model endpoint by name; :class:`~llmengine.errors.NotFoundError` if there is none."""
        payload = http_client.request_json("GET", f"{ROUTE}/{quote(model, safe='')}", timeout=timeout)
        return _parse(GetLLMEndpointResponse, payload)


def _parse(model_type: type[_M], payload: object) -> _M:
    try:
        return model_type.model_validate(payload)
    except pydantic.ValidationError as exc:
        raise ResponseFormatError(f"invalid {model_type.__name__}: {exc}") from exc
