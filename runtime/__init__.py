"""Continuous batching over a paged KV cache: requests in, token deltas out (see DESIGN.md 1-3)."""

from runtime.async_engine import AsyncEngine
from runtime.engine import Engine, RequestOutput
from runtime.llm import LLM, Completion
from runtime.params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "Completion", "Engine", "RequestOutput", "SamplingParams"]
