"""``Model.list`` / ``Model.get``: the model endpoints a server offers."""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import quote

import pydantic

from . import http_client
from .api_engine import DEFAULT_TIMEOUT
from .data_types import GetLLMEndpointResponse, ListLLMEndpointsResponse
from .errors import ResponseFormatError

ROUTE = "v1/llm/model-endpoints"
_M = TypeVar("_M", bound=pydantic.BaseModel)


class Model:
    """Look up served models (read-only: this server has no create/update/delete)."""

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
