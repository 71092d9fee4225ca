"""The serving benchmark: metric math on synthetic timestamps, and end to end against a fake SSE server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fake_sse_server import PROMPT_TOKENS, FakeServer

from llmengine_runtime.benchmarks import serving
from llmengine_runtime.benchmarks.serving import RequestResult, compute_metrics, make_requests


def test_compute_metrics_on_synthetic_timestamps():
    # request 1: sent at 0, chunks at 1, 2, 4 (3 tokens), done at 4; request 2: one token at 0.5
    a = RequestResult(ok=True, start=0.0, end=4.0, prompt_tokens=5, output_tokens=3, chunk_times=[1.0, 2.0, 4.0])
    b = RequestResult(ok=True, start=0.0, end=0.5, prompt_tokens=5, output_tokens=1, chunk_times=[0.5])
    failed = RequestResult(ok=False, start=0.0, end=0.1, error="HTTP 500: boom")
    m = compute_metrics([a, b, failed], duration=4.0)
    assert m["completed"] == 2 and m["failed"] == 1 and m["errors"] == ["HTTP 500: boom"]
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["output_throughput"] == pytest.approx(4 / 4.0)
    assert m["total_token_throughput"] == pytest.approx((10 + 4) / 4.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(750.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(750.0)
    assert m["ttft_ms"]["p99"] == pytest.approx(500 + 500 * 0.99)
    assert m["tpot_ms"]["p50"] == pytest.approx(1500.0)  # (4 - 1) / (3 - 1); the 1-token request has no TPOT
    assert m["itl_ms"]["p50"] == pytest.approx(1500.0)  # gaps 1 and 2
    assert m["itl_ms"]["p90"] == pytest.approx(1900.0)
    assert m["e2e_ms"]["p50"] == pytest.approx(2250.0)


def test_compute_metrics_all_failed_is_nan_not_error():
    m = compute_metrics([RequestResult(error="x")], duration=1.0)
    assert m["completed"] == 0 and m["failed"] == 1 and m["ttft_ms"]["p50"] != m["ttft_ms"]["p50"]


def test_make_requests_lengths_and_determinism():
    reqs = make_requests(20, (3, 9), (5, 5), seed=1)
    assert reqs == make_requests(20, (3, 9), (5, 5), seed=1)
    assert all(3 <= len(p.split()) <= 9 and n == 5 for p, n in reqs)
    assert len({len(p.split()) for p, _ in reqs}) > 1


@pytest.mark.parametrize("api", ["llm", "openai"])
@pytest.mark.slow
def test_serving_benchmark_end_to_end(tmp_path, api):
    with FakeServer() as fake:
        rc = serving.main(["--base-url", fake.url, "--model", "fake", "--api", api, "--concurrency", "1", "4",
                           "--max-new-tokens", "5", "--input-len", "4:8", "--out-dir", str(tmp_path),
                           "--no-progress"])
        bodies = fake.app.state.bodies
        max_streaming = fake.app.state.max_streaming
    assert rc == 0
    assert len(bodies) == 1 + 4 + 8  # warm-up, then 2 x concurrency per run
    report = json.loads((tmp_path / "serving.json").read_text())
    one, four = report["runs"]
    assert (one["concurrency"], four["concurrency"]) == (1, 4)
    for run in report["runs"]:
        assert run["failed"] == 0 and run["mean_output_tokens"] == 5
        assert run["total_prompt_tokens"] == PROMPT_TOKENS * run["completed"]
        assert 0 < run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]
        assert run["tpot_ms"]["p50"] > 0 and run["itl_ms"]["p99"] >= run["itl_ms"]["p50"]
    assert one["vs_single_stream"] == pytest.approx(1.0)
    assert max_streaming > 1  # concurrency 4 really overlaps its requests (a speed-up would be a timing test)
    assert four["vs_single_stream"] > 0
    md = (tmp_path / "serving.md").read_text()
    assert "| concurrency |" in md and "single stream" in md
    assert "target" not in md.lower() and "met" not in md.split()  # figures only: targets live in RESULTS.md
    assert "target_ratio" not in report
    assert (tmp_path / "serving.png").stat().st_size > 1000


@pytest.mark.slow  # the fake server and the client take seconds
def test_serving_benchmark_reports_failures(tmp_path):
    with FakeServer() as fake:
        rc = serving.main(["--base-url", fake.url, "--model", "unknown", "--concurrency", "2", "--max-new-tokens", "2",
                           "--warmup", "0", "--out-dir", str(tmp_path), "--no-progress"])
    assert rc == 1
    run = json.loads((tmp_path / "serving.json").read_text())["runs"][0]
    assert run["completed"] == 0 and run["failed"] == 4 and "HTTP 404" in run["errors"][0]


@pytest.mark.slow
def test_serving_benchmark_no_server(tmp_path):
    assert serving.main(["--base-url", "http://127.0.0.1:9", "--out-dir", str(tmp_path), "--no-progress"]) == 1


@pytest.mark.slow
def test_serving_benchmark_poisson_rate(tmp_path):
    with FakeServer() as fake:
        rc = serving.main(["--base-url", fake.url, "--model", "fake", "--request-rate", "200", "inf",
                           "--num-prompts", "6", "--max-new-tokens", "2:4", "--warmup", "0", "--out-dir", str(tmp_path),
                           "--no-progress"])
    assert rc == 0
    runs = json.loads((tmp_path / "serving.json").read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [200.0, None]
    assert all(r["completed"] == 6 and 2 <= r["mean_output_tokens"] <= 4 for r in runs)
    assert all(r["vs_single_stream"] is None for r in runs)


@pytest.mark.slow
def test_serving_benchmark_launches_and_stops_the_server(tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "SERVER_COMMAND", [sys.executable, str(Path(__file__).parent / "fake_sse_server.py")])
    launched = []
    real_launch = serving.launch_server
    monkeypatch.setattr(serving, "launch_server", lambda *a: launched.append(real_launch(*a)) or launched[-1])
    rc = serving.main(["--launch", "--model", "fake", "--concurrency", "2", "--max-new-tokens", "3",
                       "--out-dir", str(tmp_path), "--no-progress"])
    assert rc == 0 and launched and launched[0].poll() is not None  # stopped after
    assert json.loads((tmp_path / "serving.json").read_text())["runs"][0]["completed"] == 4
    assert (tmp_path / "serving-server.log").exists()
