"""Continuous batching over a paged KV cache: requests in, token deltas out (see docs/architecture.md)."""

from llmengine_runtime.runtime.async_engine import AsyncEngine
from llmengine_runtime.runtime.engine import Engine, RequestOutput
from llmengine_runtime.runtime.llm import LLM, GenerationResult
from llmengine_runtime.runtime.params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "Engine", "GenerationResult", "RequestOutput", "SamplingParams"]
