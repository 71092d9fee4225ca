"""Python client for the LLM Engine Completion API (sync, async, streaming).

    from llmengine import Completion
    response = Completion.create(model="smollm2-135m-instruct", prompt="Hello")
    print(response.output.text)   # or response.outputs[0].text

The server is ``LLM_ENGINE_BASE_PATH`` (default ``http://127.0.0.1:5005/``) or
``api_engine.set_base_path(...)``; the key is ``SCALE_API_KEY`` or ``api_engine.set_api_key(...)``.
Needs only httpx and pydantic.
"""

from . import api_engine
from .completion import Completion
from .data_types import (
    BatchCompletionsJob,
    CompletionOutput,
    CompletionStreamOutput,
    CompletionStreamResponse,
    CompletionStreamV1Response,
    CompletionSyncResponse,
    CompletionSyncV1Response,
    CreateBatchCompletionsModelConfig,
    CreateBatchCompletionsRequestContent,
    CreateBatchCompletionsV1Response,
    CreateLLMEndpointResponse,
    DeleteLLMEndpointResponse,
    GetLLMEndpointResponse,
    ListLLMEndpointsResponse,
    StreamError,
    StreamErrorContent,
    TokenOutput,
)
from .errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    BadRequestError,
    LLMEngineError,
    NotFoundError,
    RateLimitExceededError,
    ResponseFormatError,
    ServerError,
    UnauthorizedError,
    UnknownError,
    ValidationError,
)
from .model import Model

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "BadRequestError",
    "BatchCompletionsJob",
    "Completion",
    "CompletionOutput",
    "CompletionStreamOutput",
    "CompletionStreamResponse",
    "CompletionStreamV1Response",
    "CompletionSyncResponse",
    "CompletionSyncV1Response",
    "CreateBatchCompletionsModelConfig",
    "CreateBatchCompletionsRequestContent",
    "CreateBatchCompletionsV1Response",
    "CreateLLMEndpointResponse",
    "DeleteLLMEndpointResponse",
    "GetLLMEndpointResponse",
    "LLMEngineError",
    "ListLLMEndpointsResponse",
    "Model",
    "NotFoundError",
    "RateLimitExceededError",
    "ResponseFormatError",
    "ServerError",
    "StreamError",
    "StreamErrorContent",
    "TokenOutput",
    "UnauthorizedError",
    "UnknownError",
    "ValidationError",
    "__version__",
    "api_engine",
]
