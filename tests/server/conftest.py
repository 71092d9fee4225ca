"""Fixtures for the server tests: real uvicorn on a free loopback port, real HTTP (see live_server.py).

`llm_server` (session, tests/conftest.py) serves the default model with the real runtime; the fake-engine
tests use `live_server.serve(app)` with an app of their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# `real_engine` and `llm_server` live in tests/conftest.py: the SDK tests share the same server.
