"""Fixtures for the server tests: real uvicorn on a free loopback port, real HTTP (see live_server.py).

`llm_server` (session) serves the default model with the real runtime; the fake-engine tests use
`live_server.serve(app)` with an app of their own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from live_server import MODEL, serve  # noqa: E402

from server.app import create_app  # noqa: E402


@pytest.fixture(scope="session")
def real_engine(default_model_dir: Path) -> Any:
    from runtime import AsyncEngine

    return AsyncEngine(default_model_dir, name=MODEL, kv_cache_gib=0.25)  # ~340 blocks: plenty here


@pytest.fixture(scope="session")
def llm_server(real_engine: Any):
    """The default model served by the real runtime, shared by the tests of the whole session."""
    with serve(create_app({MODEL: real_engine})) as live:
        live.engine = real_engine
        yield live
