"""Fixtures for the SDK tests: the SDK from sdk/ on the path, and a fake server per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SDK_DIR = Path(__file__).resolve().parents[2] / "sdk"
sys.path.insert(0, str(SDK_DIR))  # test the source tree, whether or not llmengine is installed

from llmengine import api_engine  # noqa: E402
from sdk_fake_server import FakeLLMEngineServer  # noqa: E402


@pytest.fixture(scope="session")
def fake_server_session():
    server = FakeLLMEngineServer().start()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server_session, monkeypatch):
    """The fake server, its records cleared, as the SDK's base path; no key, no env settings."""
    monkeypatch.delenv("SCALE_API_KEY", raising=False)
    monkeypatch.delenv("LLM_ENGINE_BASE_PATH", raising=False)
    fake_server_session.reset()
    api_engine.set_base_path(fake_server_session.url)
    api_engine.set_api_key(None)
    yield fake_server_session
    api_engine.set_base_path(None)
    api_engine.set_api_key(None)
