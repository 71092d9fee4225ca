"""Server behaviour that needs a controllable engine: auth, back-pressure, readiness, failures mid-stream,
graceful shutdown, body limits, metrics. Real uvicorn and real HTTP; the engine is tests/server/fake_engine.py."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import httpx
import pytest
from fake_engine import FakeEngine
from live_server import LiveServer, llm_body, serve, wait_for

from llmengine_runtime.server.app import create_app
from tests.fast import fast_subset

SYNC = "/v1/llm/completions-sync?model_endpoint_name=fake"
STREAM = "/v1/llm/completions-stream?model_endpoint_name=fake"


def events(response: httpx.Response) -> list[dict]:
    """The JSON of every `data:` event of a finished LLM Engine stream."""
    return [json.loads(line[len("data: "):]) for line in response.text.split("\n") if line.startswith("data: ")]


@pytest.fixture
def fake_server():
    engine = FakeEngine()
    with serve(create_app({"fake": engine})) as live:
        live.engine = engine
        yield live


def test_sync_and_stream_shapes_with_request_id(fake_server):
    r = httpx.post(fake_server.url + SYNC, json=llm_body("a b c", max_new_tokens=3))
    assert r.status_code == 200
    body = r.json()
    assert body == {"request_id": r.headers["x-request-id"], "output": {
        "text": " w0 w1 w2", "num_prompt_tokens": 3, "num_completion_tokens": 3, "tokens": None}}
    assert uuid.UUID(body["request_id"]).version == 4
    r = httpx.post(fake_server.url + STREAM, json=llm_body("a b", max_new_tokens=3))
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    assert [c["output"]["text"] for c in chunks] == [" w0", " w1", " w2"]
    assert [c["output"]["finished"] for c in chunks] == [False, False, True]
    assert all(c["request_id"] == r.headers["x-request-id"] and c["error"] is None for c in chunks)
    assert fake_server.engine.started


def test_empty_deltas_are_skipped_but_the_final_one_is_sent(fake_server):
    r = httpx.post(fake_server.url + STREAM, json=llm_body("quiet", max_new_tokens=5))
    chunks = [c["output"] for c in events(r)]
    # tokens 1, 3, 5 have no text; only the last of them (finished) is sent
    assert [(c["text"], c["num_completion_tokens"], c["finished"]) for c in chunks] == [
        (" w1", 2, False), (" w3", 4, False), ("", 5, True)]
    r = httpx.post(fake_server.url + STREAM, json=llm_body("quiet", max_new_tokens=5, return_token_log_probs=True))
    chunks = [c["output"] for c in events(r)]
    assert [c["num_completion_tokens"] for c in chunks] == [1, 2, 3, 4, 5]  # log probs need every token
    assert [c["token"]["log_prob"] for c in chunks] == [-0.5, -1.0, -1.5, -2.0, -2.5]


def test_engine_error_mid_stream_becomes_an_error_chunk_then_close(fake_server):
    for prompt in ("fail-after 2", "raise-after 2"):
        r = httpx.post(fake_server.url + STREAM, json=llm_body(prompt, max_new_tokens=10))
        assert r.status_code == 200
        lines = r.text.split("\n")
        assert all(line.startswith("data: {") or line == "" for line in lines)
        chunks = events(r)
        assert [c["output"]["text"] for c in chunks[:2]] == [" w0", " w1"]
        error = chunks[2]
        assert error["output"] is None and error["request_id"] == r.headers["x-request-id"]
        assert error["error"]["status_code"] == 500
        assert set(error["error"]["content"]) == {"error", "timestamp"}
        assert ("boom" if prompt.startswith("fail") else "exploded") in error["error"]["content"]["error"]
        assert len(chunks) == 3


def test_engine_error_before_anything_is_sent_is_a_status(fake_server):
    for route in (SYNC, STREAM):
        r = httpx.post(fake_server.url + route, json=llm_body("fail-after 0", max_new_tokens=10))
        assert r.status_code == 500
        assert "boom" in r.json()["detail"]
    assert httpx.post(fake_server.url + SYNC, json=llm_body("a", max_new_tokens=1)).status_code == 200


def test_context_overflow_message_has_the_token_counts(fake_server):
    r = httpx.post(fake_server.url + SYNC, json=llm_body("a b c", max_new_tokens=62))
    assert r.status_code == 400
    assert "3 tokens" in r.json()["detail"] and "62" in r.json()["detail"] and "64" in r.json()["detail"]


def test_disconnects_abort_and_free_blocks(fake_server):
    engine = fake_server.engine
    engine.delay = 0.05
    with pytest.raises(httpx.ReadTimeout):  # a sync client that gives up
        httpx.post(fake_server.url + SYNC, json=llm_body("a", max_new_tokens=60), timeout=0.3)
    with httpx.Client() as client, client.stream("POST", fake_server.url + STREAM,
                                                 json=llm_body("a", max_new_tokens=60)) as r:
        next(r.iter_lines())
    assert wait_for(lambda: len(engine.aborts) == 2, timeout=3), engine.aborts
    assert engine.stats()["blocks_used"] == 0 and not fake_server.state.jobs


def test_back_pressure_429_at_once_then_serves_again():
    engine = FakeEngine(delay=0.05)
    with serve(create_app({"fake": engine}, max_queue=2)) as live, httpx.Client(timeout=10) as client:
        with client.stream("POST", live.url + STREAM, json=llm_body("a", max_new_tokens=60)) as s1, \
                client.stream("POST", live.url + STREAM, json=llm_body("b", max_new_tokens=60)) as s2:
            lines1, lines2 = s1.iter_lines(), s2.iter_lines()  # keep them: a dropped iterator closes its stream
            next(lines1), next(lines2)
            start = time.monotonic()
            r = httpx.post(live.url + SYNC, json=llm_body("c", max_new_tokens=1))
            assert r.status_code == 429 and time.monotonic() - start < 1.0
            assert "limit is 2" in r.json()["detail"]
        assert wait_for(lambda: not live.state.jobs, timeout=3)
        assert httpx.post(live.url + SYNC, json=llm_body("c", max_new_tokens=1)).status_code == 200


def test_readyz_503_until_the_models_are_loaded():
    release = threading.Event()
    engine = FakeEngine()

    def load():
        release.wait(10)
        return {"fake": engine}

    with serve(create_app(load)) as live:
        assert httpx.get(live.url + "/healthz").status_code == 200
        assert httpx.get(live.url + "/healthcheck").status_code == 200
        r = httpx.get(live.url + "/readyz")
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        assert httpx.post(live.url + SYNC, json=llm_body("a")).status_code == 503
        release.set()
        assert wait_for(lambda: httpx.get(live.url + "/readyz").status_code == 200)
        assert httpx.get(live.url + "/readyz").json()["models"] == ["fake"]
        assert httpx.post(live.url + SYNC, json=llm_body("a", max_new_tokens=2)).status_code == 200
    assert engine.shut_down


def test_load_failure_shows_in_readyz():
    def load():
        raise FileNotFoundError("no weights for model x")

    with serve(create_app(load)) as live:
        assert wait_for(lambda: "no weights" in httpx.get(live.url + "/readyz").text)
        assert httpx.get(live.url + "/readyz").status_code == 503
        assert httpx.post(live.url + SYNC, json=llm_body("a")).status_code == 503


def test_readyz_and_healthz_503_once_an_engine_has_stopped():
    """An engine whose tensor-parallel worker died fails readiness (a load balancer stops sending to it) and
    liveness (an orchestrator restarts it), both with the reason."""
    engine = FakeEngine()
    with serve(create_app({"fake": engine})) as live:
        assert httpx.get(live.url + "/readyz").status_code == 200
        engine.failed = "tensor-parallel worker(s) ['rank 1 (pid 7, exit code -9)'] exited"
        r = httpx.get(live.url + "/readyz")
        assert r.status_code == 503 and "fake stopped: tensor-parallel worker(s)" in r.json()["detail"]
        r = httpx.get(live.url + "/healthz")
        assert r.status_code == 503 and "fake stopped: tensor-parallel worker(s)" in r.json()["detail"]


@pytest.mark.parametrize("key_header", fast_subset(["basic", "bearer", "x-api-key"], ["bearer"]))
def test_auth_on(key_header):
    engine = FakeEngine()
    key = "s3cret-key"
    good = {"basic": {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()},
            "bearer": {"Authorization": f"Bearer {key}"}, "x-api-key": {"x-api-key": key}}[key_header]
    with serve(create_app({"fake": engine}, api_key=key)) as live:
        for path in ("/healthz", "/healthcheck", "/readyz"):
            assert httpx.get(live.url + path).status_code == 200
        wrong = {"Authorization": "Bearer nope", "x-api-key": "s3cret-kez"}
        for headers in ({}, wrong, {"Authorization": "Basic " + base64.b64encode(b"nope:").decode()}):
            r = httpx.post(live.url + SYNC, json=llm_body("a"), headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["detail"]
            assert r.headers["x-request-id"]
            for path in ("/metrics", "/v1/llm/model-endpoints", "/v1/models"):
                assert httpx.get(live.url + path, headers=headers).status_code == 401
        assert httpx.post(live.url + SYNC, json=llm_body("a", max_new_tokens=2), headers=good).status_code == 200
        assert httpx.get(live.url + "/metrics", headers=good).status_code == 200
        assert httpx.get(live.url + "/v1/llm/model-endpoints", headers=good).status_code == 200


def test_auth_off_is_open(fake_server):
    assert httpx.post(fake_server.url + SYNC, json=llm_body("a", max_new_tokens=1)).status_code == 200
    assert httpx.get(fake_server.url + "/metrics").status_code == 200
    assert httpx.post(fake_server.url + SYNC, json=llm_body("a", max_new_tokens=1),
                      headers={"Authorization": "Bearer whatever"}).status_code == 200


def test_body_size_limit():
    with serve(create_app({"fake": FakeEngine()}, max_body_bytes=1000)) as live:
        big = llm_body("a " * 600)
        r = httpx.post(live.url + SYNC, json=big)  # Content-Length over the limit
        assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]

        def chunked():  # no Content-Length: counted while reading
            data = json.dumps(big).encode()
            for i in range(0, len(data), 100):
                yield data[i:i + 100]

        r = httpx.post(live.url + SYNC, content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert httpx.post(live.url + SYNC, json=llm_body("a", max_new_tokens=1)).status_code == 200


def test_graceful_shutdown_ends_streams_with_an_error_chunk():
    engine = FakeEngine(delay=0.05)
    live = LiveServer(create_app({"fake": engine}), grace=0.3).start()
    received: list[str] = []

    def client():
        with httpx.Client(timeout=10) as c, c.stream("POST", live.url + STREAM,
                                                     json=llm_body("a", max_new_tokens=60)) as r:
            received.extend(r.iter_lines())

    t = threading.Thread(target=client)
    t.start()
    assert wait_for(lambda: len(received) >= 2)
    start = time.monotonic()
    live.stop()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - start < 5
    last = json.loads([line for line in received if line.startswith("data: ")][-1][len("data: "):])
    assert last["output"] is None and last["error"]["status_code"] == 503
    assert "shutting down" in last["error"]["content"]["error"]
    assert engine.shut_down and engine.stats()["blocks_used"] == 0


def test_metrics(fake_server):
    httpx.post(fake_server.url + SYNC, json=llm_body("a", max_new_tokens=3))
    httpx.post(fake_server.url + STREAM, json=llm_body("a", max_new_tokens=2))
    httpx.post(fake_server.url + SYNC + "x", json=llm_body("a"))
    text = httpx.get(fake_server.url + "/metrics").text
    assert 'llmengine_http_requests_total{route="/v1/llm/completions-sync",status="200"} 1.0' in text
    assert 'llmengine_http_requests_total{route="/v1/llm/completions-stream",status="200"} 1.0' in text
    assert 'llmengine_http_requests_total{route="/v1/llm/completions-sync",status="404"} 1.0' in text
    assert 'llmengine_generated_tokens_total{model="fake"} 5.0' in text
    assert 'llmengine_time_to_first_token_seconds_count{model="fake"} 2.0' in text
    assert 'llmengine_time_per_output_token_seconds_count{model="fake"} 3.0' in text
    assert 'llmengine_kv_blocks_used{model="fake"} 0.0' in text
    assert 'llmengine_kv_blocks_free{model="fake"} 100.0' in text
    assert 'llmengine_queue_depth{model="fake"} 0.0' in text
    assert "llmengine_requests_in_flight 0.0" in text
