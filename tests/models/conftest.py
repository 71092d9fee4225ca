"""Fixtures the model tests share."""

from __future__ import annotations

import pytest

from tests.models.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny checkpoints by variant name, saved on first use (once per test module)."""
    class Dirs(dict):
        def __missing__(self, variant):
            self[variant] = save_tiny(variant, tmp_path_factory.mktemp(variant))
            return self[variant]
    return Dirs()
