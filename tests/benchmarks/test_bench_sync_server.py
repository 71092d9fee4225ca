"""benchmarks/sync_server.py's server half against the fake server: it launches, times each sync request, stops."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import httpx
import pytest

from llmengine_runtime.benchmarks import serving, sync_server
from llmengine_runtime.benchmarks.common import spread
from tests.benchmarks import fake_sse_server


@pytest.mark.slow  # starts a server process
def test_server_half_times_sync_requests(tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "SERVER_COMMAND", [sys.executable, str(Path(__file__).parent / "fake_sse_server.py")])
    launched = []
    real_launch = serving.launch_server
    monkeypatch.setattr(sync_server, "launch_server", lambda *a: launched.append(real_launch(*a)) or launched[-1])
    args = Namespace(model="fake", threads=1, max_new_tokens=20, repeats=3, warmup=1, out_dir=str(tmp_path),
                     name="sync")
    rates, ready = sync_server.ours(args)
    assert launched and launched[0].poll() is not None  # stopped after
    assert len(rates) == 3 and ready > 0
    # 20 tokens at TOKEN_SECONDS each (plus HTTP): no faster than the fake's pace
    assert all(0 < r <= 1 / fake_sse_server.TOKEN_SECONDS for r in rates)
    report = dict(vars(args), ready_s=ready, engines={"ours (server)": spread(rates),
                                                       "llama.cpp": spread([r / 2 for r in rates])})
    table = sync_server.markdown(report)
    assert "| ours (server) |" in table and "| 2.00x |" in table and "| llama.cpp |" in table
    assert sync_server.plot(report, tmp_path / "sync.png").stat().st_size > 1000


def test_an_unknown_endpoint_stops_the_benchmark(tmp_path, monkeypatch):
    """A refused request ends the run with the HTTP error, not with a rate of nothing."""
    with fake_sse_server.FakeServer() as fake:
        monkeypatch.setattr(sync_server, "launch_server", lambda server, log: _attach(server, fake.url))
        monkeypatch.setattr(sync_server, "stop_server", lambda proc: None)
        args = Namespace(model="other", threads=1, max_new_tokens=4, repeats=1, warmup=0, out_dir=str(tmp_path),
                         name="sync")
        with pytest.raises(httpx.HTTPStatusError, match="404"):
            sync_server.ours(args)


def _attach(server, url: str):
    server.base_url = url
    return None
