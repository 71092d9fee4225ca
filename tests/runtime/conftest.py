"""Fixtures for the runtime tests: one shared engine on the default model, tiny random checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmengine_runtime.models.config import load_config
from llmengine_runtime.runtime import LLM
from llmengine_runtime.runtime.block_manager import kv_block_bytes
from tests.models.tiny import save_tiny


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: these tests check results, not speed, and on a shared 2-core machine two
    threads that wait on each other make small steps 5-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_llm(default_model_dir: Path) -> LLM:
    """The default model in fp32 on CPU with a small cache; tests share it. Prefix caching is off, so it
    holds no state between generate calls (and chunked-prefill tests compute what they mean to)."""
    return LLM(default_model_dir, device="cpu", kv_cache_gib=0.25, max_num_batched_tokens=512,
               enable_prefix_caching=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Callable[[str], Path]:
    """variant -> folder of a tiny random checkpoint (no tokenizer), saved once per session."""
    saved: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in saved:
            saved[variant] = save_tiny(variant, tmp_path_factory.mktemp(variant))
        return saved[variant]

    return make


def _cache_gib(model_dir: Path, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32) -> float:
    return (num_blocks + 0.5) * kv_block_bytes(load_config(model_dir), dtype, block_size) / (1 << 30)


@pytest.fixture(scope="session")
def cache_gib() -> Callable[..., float]:
    """(model_dir, num_blocks, block_size[, dtype]) -> the kv_cache_gib that gives exactly num_blocks blocks of
    that KV-cache type (fp32 unless said: quantized weights on CPU get fp16 caches)."""
    return _cache_gib
