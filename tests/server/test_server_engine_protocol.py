"""The server's `ServedEngine` protocol, the real AsyncEngine and the tests' fake engine agree: same members,
same parameter names, kinds and defaults. If one of them drifts, this fails (and the fake-engine tests
would otherwise keep passing against an API the real engine no longer has)."""

from __future__ import annotations

import inspect
import typing

import pytest
from fake_engine import FakeEngine
from test_server_serve_cli import write_tiny_llama

from llmengine_runtime.runtime import AsyncEngine
from llmengine_runtime.server.state import ServedEngine

METHODS = sorted(name for name, value in vars(ServedEngine).items()
                 if callable(value) and not name.startswith("_"))
ATTRIBUTES = sorted(typing.get_type_hints(ServedEngine))


def shape(function) -> list[tuple[str, inspect._ParameterKind, object]]:
    """A signature without annotations: what a caller relies on."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_protocol_names_what_the_server_calls():
    assert METHODS == ["abort", "add_request", "failure", "shutdown", "start", "stats"]
    assert ATTRIBUTES == ["max_model_len", "name", "tokenizer"]


@pytest.mark.parametrize("implementation", [AsyncEngine, FakeEngine])
@pytest.mark.parametrize("method", METHODS)
def test_methods_match_the_protocol(implementation, method):
    assert shape(getattr(implementation, method)) == shape(getattr(ServedEngine, method))


def test_instances_have_the_attributes(tmp_path):
    real = AsyncEngine(write_tiny_llama(tmp_path / "tiny"), name="tiny", kv_cache_gib=0.01)
    try:
        for engine in (real, FakeEngine()):
            for attribute in ATTRIBUTES:
                assert hasattr(engine, attribute), f"{type(engine).__name__} has no {attribute}"
            assert isinstance(engine.max_model_len, int) and isinstance(engine.name, str)
    finally:
        real.shutdown()
