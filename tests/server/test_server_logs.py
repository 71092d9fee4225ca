"""The server's own log lines (server/logs.py): why each 4xx was given, one summary line per finished request,
load timings; and `llmengine serve` printing them beside uvicorn's, with a progress bar over the weights."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from types import SimpleNamespace

import httpx
import pytest
from fake_engine import FakeEngine
from live_server import llm_body, serve, wait_for

from llmengine_runtime.server import logs
from llmengine_runtime.server.app import create_app
from llmengine_runtime.server.state import ServerState

SYNC = "/v1/llm/completions-sync?model_endpoint_name=fake"
STREAM = "/v1/llm/completions-stream?model_endpoint_name=fake"
SUMMARY = re.compile(r"request (\S+) fake: (\d+) prompt \+ (\d+) completion tokens, TTFT (\d+) ms, ([\d.]+|-) tok/s, "
                     r"finish (.+)$")


@pytest.fixture
def server_log(caplog):
    caplog.set_level(logging.INFO, logger="llmengine.server")
    return caplog


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "llmengine.server"]


def summaries(caplog) -> dict[str, tuple]:
    """request id -> (prompt tokens, completion tokens, ttft ms, tok/s, finish reason)"""
    found = {}
    for message in messages(caplog):
        if m := SUMMARY.match(message):
            found[m[1]] = (int(m[2]), int(m[3]), int(m[4]), m[5], m[6])
    return found


@pytest.fixture
def fake_server():
    engine = FakeEngine(delay=0.005)
    with serve(create_app({"fake": engine}, api_key="k", max_body_bytes=2000)) as live:
        live.engine = engine
        yield live


AUTH = {"x-api-key": "k"}


def test_each_4xx_logs_its_status_route_and_detail(fake_server, server_log):
    url = fake_server.url
    cases = [
        (httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "fake", "prompt": "a", "temperature": -1}),
         "400 POST /v1/completions: ", "temperature"),
        (httpx.post(url + "/v1/llm/completions-sync?model_endpoint_name=ghost", headers=AUTH, json=llm_body()),
         "404 POST /v1/llm/completions-sync: ", "model 'ghost' is not served here"),
        (httpx.get(url + "/v1/models"), "401 GET /v1/models: ", "missing or invalid API key"),  # the middleware's
        (httpx.post(url + SYNC, headers=AUTH, content=b"x" * 3000), "413 POST /v1/llm/completions-sync: ",
         "request body too large"),
        (httpx.post(url + SYNC, headers=AUTH, json=llm_body("", max_new_tokens=2)),
         "400 POST /v1/llm/completions-sync: ", "prompt is empty"),
    ]
    for response, head, detail in cases:
        rid = response.headers["x-request-id"]
        assert wait_for(lambda rid=rid: any(rid in m for m in messages(server_log)), timeout=5), messages(server_log)
        [line] = [m for m in messages(server_log) if rid in m]
        assert line.startswith(head) and detail in line and line.endswith(f"(request {rid})"), line
        assert str(response.status_code) == head[:3]
    assert not summaries(server_log)  # refused before any engine request: no summary line


def test_success_is_not_logged_as_a_refusal(fake_server, server_log):
    r = httpx.post(fake_server.url + SYNC, headers=AUTH, json=llm_body("a b c", max_new_tokens=3))
    assert r.status_code == 200
    assert wait_for(lambda: summaries(server_log), timeout=5)
    assert not [m for m in messages(server_log) if m.startswith(("2", "4"))]


def test_one_summary_line_per_finished_request(fake_server, server_log):
    r = httpx.post(fake_server.url + SYNC, headers=AUTH, json=llm_body("a b c", max_new_tokens=5))
    rid = r.headers["x-request-id"]
    assert wait_for(lambda: rid in summaries(server_log), timeout=5)
    prompt, completion, ttft, rate, finish = summaries(server_log)[rid]
    assert (prompt, completion, finish) == (3, 5, "length")
    assert ttft >= 0 and float(rate) > 0
    r = httpx.post(fake_server.url + STREAM, headers=AUTH, json=llm_body("fail-after 2 x", max_new_tokens=5))
    rid = r.headers["x-request-id"]
    assert wait_for(lambda: rid in summaries(server_log), timeout=5)
    assert summaries(server_log)[rid][1:2] == (2,) and summaries(server_log)[rid][4] == "error"
    assert len([m for m in messages(server_log) if m.startswith("request ")]) == 2


def test_a_client_that_leaves_is_summarised_as_such(fake_server, server_log):
    fake_server.engine.delay = 0.05
    with httpx.stream("POST", fake_server.url + STREAM, headers=AUTH, json=llm_body("a", max_new_tokens=60)) as r:
        rid = r.headers["x-request-id"]
        next(r.iter_lines())
    assert wait_for(lambda: rid in summaries(server_log), timeout=10)
    prompt, completion, _, _, finish = summaries(server_log)[rid]
    assert finish == "client disconnected" and 1 <= completion < 60
    assert wait_for(lambda: fake_server.engine.stats()["blocks_used"] == 0)


def test_load_timings(server_log):
    state = ServerState(lambda: {"fake": FakeEngine()}, max_queue=4)
    state.load()
    assert state.ready
    assert any(re.fullmatch(r"ready: fake loaded and started in \d+\.\d s", m) for m in messages(server_log))
    logs.model_loaded("fake", FakeEngine(blocks_total=7, max_model_len=64), 1.25, warmed_up=True)
    inner = SimpleNamespace(dtype="torch.float32", device="cpu", block_manager=SimpleNamespace(block_size=16))
    engine = SimpleNamespace(engine=inner, max_model_len=128, stats=lambda: {"blocks_total": 9})
    logs.model_loaded("real", engine, 0.5, warmed_up=False)
    inner.kv_cache_dtype = "torch.float16"  # a cache type other than the model's is said
    logs.model_loaded("quantized", engine, 0.5, warmed_up=False)
    assert messages(server_log)[-3:] == [
        "fake loaded in 1.2 s (7 KV blocks, context 64 tokens, including the torch.compile warm-up)",
        "real loaded in 0.5 s (float32 on cpu, 9 KV blocks of 16 tokens, context 128 tokens)",
        "quantized loaded in 0.5 s (float32 on cpu, 9 KV blocks of 16 tokens in float16, context 128 tokens)"]


def test_a_missing_model_is_logged_in_one_line_without_a_traceback(server_log, tmp_path):
    from llmengine_runtime.models.zoo import resolve_model

    state = ServerState(lambda: {"x": resolve_model(tmp_path / "nothing", {})}, max_queue=4)
    (tmp_path / "nothing").mkdir()
    state.load()
    [record] = [r for r in server_log.records if r.name == "llmengine.server"]
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert "not a model folder" in record.getMessage() and "not a model folder" in state.load_error


@pytest.fixture
def restore_llmengine_logger():
    loggers = [logging.getLogger(name) for name in ("llmengine", "runtime")]
    saved = [(list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    yield loggers[0]
    for logger, (handlers, level, propagate) in zip(loggers, saved):
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def test_configure_prints_like_uvicorn_once(restore_llmengine_logger, capsys):
    logs.configure()
    logs.configure()  # twice: still one handler
    logs.log.info("hello %s", "there")
    logging.getLogger("llmengine.server").debug("not shown at info")
    logging.getLogger("runtime").info("the engine's own lines too")  # e.g. the torch.compile warm-up
    assert capsys.readouterr().err.splitlines() == ["INFO:     hello there", "INFO:     the engine's own lines too"]


@pytest.mark.slow
def test_serve_prints_progress_load_time_refusals_and_summaries(tmp_path):
    from test_server_serve_cli import free_port, start_serve, write_tiny_llama

    folder = write_tiny_llama(tmp_path / "tiny")
    port = free_port()
    proc, lines = start_serve(["--model", f"alpha={folder}", "--port", str(port)], dict(os.environ))
    try:
        assert wait_for(lambda: any("llmengine: serving" in line for line in lines) or proc.poll() is not None,
                        timeout=120), "".join(lines)
        url = f"http://127.0.0.1:{port}"
        ok = httpx.post(url + "/v1/completions", timeout=60,
                        json={"model": "alpha", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0})
        bad = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": [5], "max_tokens": 0})
        assert ok.status_code == 200 and bad.status_code == 400
        rid = ok.headers["x-request-id"]
        assert wait_for(lambda: any(f"request {rid} alpha" in line for line in lines), timeout=10), "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = "".join(lines)
    assert f"INFO:     loading alpha from {folder}" in out
    assert re.search(r"loading tiny: 100%.*tensor", out), out  # the tqdm bar over the weights (folder name)
    assert re.search(r"INFO:     alpha loaded in \d+\.\d s \(float32 on cpu, \d+ KV blocks of \d+ tokens", out), out
    assert re.search(rf"INFO:     request {rid} alpha: 3 prompt \+ 3 completion tokens, TTFT \d+ ms, [\d.]+ tok/s, "
                     r"finish length", out), out
    assert re.search(r"INFO:     400 POST /v1/completions: .*max_tokens.*\(request ", out), out
