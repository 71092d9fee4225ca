"""Continuous batching over a paged KV cache: requests in, token deltas out (see docs/architecture.md)."""

from runtime.async_engine import AsyncEngine
from runtime.engine import Engine, RequestOutput
from runtime.llm import LLM, GenerationResult
from runtime.params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "Engine", "GenerationResult", "RequestOutput", "SamplingParams"]
