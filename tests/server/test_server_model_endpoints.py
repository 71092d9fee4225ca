"""Models loaded and unloaded at run time (server/model_endpoints.py): status while loading, READY or
UPDATE_FAILED with the reason, duplicate names, confined checkpoint paths, unloading (new requests 404,
requests in flight end with a clear error, the engine is shut down and garbage-collected), the API key,
and the routes this server never serves (501). The fake engine for the protocol, a tiny GGUF for a real
engine."""

from __future__ import annotations

import gc
import json
import os
import threading
import weakref

import httpx
import pytest
from fake_engine import FakeEngine
from live_server import llm_body, serve, wait_for

from llmengine_runtime.runtime import AsyncEngine
from llmengine_runtime.server import model_endpoints
from llmengine_runtime.server.app import create_app
from tests.models.test_gguf import WORDS, write_tiny_gguf

ROUTE = "/v1/llm/model-endpoints"


class Factory:
    """Builds fake engines; `gate` holds a load back, `fail` makes it fail; keeps weak references only."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.fail: str | None = None
        self.built: list[weakref.ref] = []

    def __call__(self, name, folder, max_model_len):
        assert self.gate.wait(30)
        if self.fail:
            raise RuntimeError(self.fail)
        engine = FakeEngine(name=name, delay=0.01)
        self.built.append(weakref.ref(engine))
        return engine


def model_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def create_body(name: str, checkpoint_path: str | None, **overrides) -> dict:
    """What the official client's Model.create sends (CreateLLMEndpointRequest.dict())."""
    body = {"name": name, "model_name": "base", "source": "hugging_face", "inference_framework": "vllm",
            "inference_framework_image_tag": "latest", "num_shards": 1, "quantize": None,
            "checkpoint_path": checkpoint_path, "max_model_len": None, "metadata": {}, "min_workers": 0,
            "max_workers": 1, "per_worker": 2, "labels": {}, "endpoint_type": "streaming", "cpus": None}
    return {**body, **overrides}


@pytest.fixture
def live(tmp_path):
    factory = Factory()
    models = tmp_path / "models"
    model_folder(models / "second")
    app = create_app({"fake": FakeEngine()}, models_dir=models, batch_dir=tmp_path / "batch", engine_factory=factory)
    with serve(app) as live:
        live.factory, live.models = factory, models
        yield live


def status(live, name: str) -> str:
    return httpx.get(f"{live.url}{ROUTE}/{name}").json()["status"]


@pytest.mark.slow
def test_create_complete_delete(live):
    live.factory.gate.clear()
    r = httpx.post(live.url + ROUTE, json=create_body("two", "second"))
    assert r.status_code == 200, r.text
    assert r.json()["endpoint_creation_task_id"].startswith("load-")
    info = httpx.get(f"{live.url}{ROUTE}/two").json()
    assert info["status"] == "UPDATE_IN_PROGRESS" and info["checkpoint_path"] == "second"
    assert info["model_name"] == "base" and info["error"] is None
    sync = httpx.post(f"{live.url}/v1/llm/completions-sync?model_endpoint_name=two", json=llm_body("a", 2))
    assert sync.status_code == 404  # not served until loaded
    live.factory.gate.set()
    assert wait_for(lambda: status(live, "two") == "READY")
    assert [e["name"] for e in httpx.get(live.url + ROUTE).json()["model_endpoints"]] == ["fake", "two"]
    sync = httpx.post(f"{live.url}/v1/llm/completions-sync?model_endpoint_name=two", json=llm_body("a", 2))
    assert sync.status_code == 200 and sync.json()["output"]["text"] == " w0 w1"

    r = httpx.delete(f"{live.url}{ROUTE}/two")
    assert r.status_code == 200 and r.json() == {"deleted": True}
    assert httpx.get(f"{live.url}{ROUTE}/two").status_code == 404
    sync = httpx.post(f"{live.url}/v1/llm/completions-sync?model_endpoint_name=two", json=llm_body("a", 2))
    assert sync.status_code == 404
    gc.collect()
    assert live.factory.built[0]() is None  # shut down and every reference dropped
    assert httpx.get(live.url + "/readyz").json()["models"] == ["fake"]


def test_a_failed_load_reports_why_and_can_be_replaced(live):
    live.factory.fail = "no memory left"
    assert httpx.post(live.url + ROUTE, json=create_body("two", "second")).status_code == 200
    assert wait_for(lambda: status(live, "two") == "UPDATE_FAILED")
    assert "no memory left" in httpx.get(f"{live.url}{ROUTE}/two").json()["error"]
    again = httpx.post(live.url + ROUTE, json=create_body("two", "second"))
    assert again.status_code == 400 and "'two' already exists (status UPDATE_FAILED)" in again.json()["detail"]
    assert httpx.delete(f"{live.url}{ROUTE}/two").json() == {"deleted": True}
    live.factory.fail = None
    assert httpx.post(live.url + ROUTE, json=create_body("two", "second")).status_code == 200
    assert wait_for(lambda: status(live, "two") == "READY")


def test_deleting_while_loading_discards_the_engine(live):
    live.factory.gate.clear()
    assert httpx.post(live.url + ROUTE, json=create_body("two", "second")).status_code == 200
    assert httpx.delete(f"{live.url}{ROUTE}/two").json() == {"deleted": True}
    live.factory.gate.set()
    assert wait_for(lambda: live.factory.built and (live.factory.built[0]() is None or
                                                    live.factory.built[0]().shut_down))
    assert httpx.get(f"{live.url}{ROUTE}/two").status_code == 404
    assert "two" not in live.state.engines


@pytest.mark.slow
def test_requests_in_flight_end_with_a_clear_error_when_their_model_is_unloaded(live, monkeypatch):
    monkeypatch.setattr(model_endpoints, "UNLOAD_GRACE", 0.3)
    assert httpx.post(live.url + ROUTE, json=create_body("two", "second")).status_code == 200
    assert wait_for(lambda: status(live, "two") == "READY")
    live.state.engines["two"].delay = 0.05
    url = f"{live.url}/v1/llm/completions-stream?model_endpoint_name=two"
    with httpx.stream("POST", url, json=llm_body("a", 50), timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.delete(f"{live.url}{ROUTE}/two", timeout=30).json() == {"deleted": True}
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert chunks[-1]["error"] and "'two' was unloaded" in chunks[-1]["error"]["content"]["error"]
    assert len(chunks) < 50
    gc.collect()
    assert live.factory.built[0]() is None


@pytest.mark.slow
def test_a_batch_job_on_an_unloaded_model_fails_and_lets_go_of_it(live):
    assert httpx.post(live.url + ROUTE, json=create_body("two", "second")).status_code == 200
    assert wait_for(lambda: status(live, "two") == "READY")
    live.state.engines["two"].delay = 0.05
    body = {"output_data_path": "o.json", "model_config": {"model": "two"},
            "content": {"prompts": ["a"] * 20, "max_new_tokens": 10, "temperature": 0.0}}
    job_id = httpx.post(live.url + "/v1/llm/batch-completions", json=body).json()["job_id"]
    assert wait_for(lambda: live.factory.built[0]().stats()["blocks_used"] > 0)
    assert httpx.delete(f"{live.url}{ROUTE}/two", timeout=30).json() == {"deleted": True}
    def job() -> dict:
        return httpx.get(f"{live.url}/v2/batch-completions/{job_id}").json()["job"]

    assert wait_for(lambda: job()["status"] == "failed")
    assert "'two' was unloaded" in job()["error"]
    assert wait_for(lambda: gc.collect() is not None and live.factory.built[0]() is None)


@pytest.mark.parametrize("body, detail", [
    (create_body("fake", "second"), "'fake' already exists"),
    (create_body("bad name!", "second"), "name 'bad name!' is not accepted"),
    (create_body("two", None), "checkpoint_path is required"),
    (create_body("two", "second", quantize="awq"), "quantize='awq' is not supported"),
    (create_body("two", "second", num_shards=2), "num_shards=2"),
    (create_body("two", "missing"), "'missing' does not exist"),
    (create_body("two", "config-only"), "is not a model folder"),
    (create_body("two", "../outside"), "outside the allowed directory"),
    (create_body("two", "OUTSIDE"), "outside the allowed directory"),
    (create_body("two", "link-out"), "outside the allowed directory"),
    (create_body("two", "s3://bucket/model"), "is a URL"),
    (create_body("two", "file:///etc"), "is a URL"),
    ({"checkpoint_path": "second"}, "name: field required"),
])
def test_bad_creates_are_400s_naming_the_problem(live, tmp_path, body, detail):
    outside = model_folder(tmp_path / "outside")  # a valid model folder, but not under --models-dir
    os.symlink(outside, live.models / "link-out")
    (live.models / "config-only").mkdir()
    (live.models / "config-only" / "config.json").write_text("{}")
    if body.get("checkpoint_path") == "OUTSIDE":
        body = {**body, "checkpoint_path": str(outside)}
    r = httpx.post(live.url + ROUTE, json=body)
    assert r.status_code == 400 and detail in r.json()["detail"], r.text
    if "allowed directory" in detail:
        assert str(live.models) in r.json()["detail"]
    assert live.factory.built == [] and [e["name"] for e in httpx.get(live.url + ROUTE).json()["model_endpoints"]] \
        == ["fake"]


def test_delete_unknown_or_started_models(live):
    r = httpx.delete(f"{live.url}{ROUTE}/nope")
    assert r.status_code == 404 and "'nope' does not exist" in r.json()["detail"]
    r = httpx.delete(f"{live.url}{ROUTE}/fake")
    assert r.status_code == 400 and "given at start" in r.json()["detail"]
    assert httpx.post(f"{live.url}/v1/llm/completions-sync?model_endpoint_name=fake",
                      json=llm_body("a", 1)).status_code == 200


def test_create_and_delete_need_the_api_key(tmp_path):
    model_folder(tmp_path / "m" / "second")
    app = create_app({"fake": FakeEngine()}, api_key="k", models_dir=tmp_path / "m", batch_dir=tmp_path / "b",
                     engine_factory=Factory())
    with serve(app) as live:
        assert httpx.post(live.url + ROUTE, json=create_body("two", "second")).status_code == 401
        assert httpx.delete(f"{live.url}{ROUTE}/two").status_code == 401
        assert httpx.post(live.url + "/v1/llm/batch-completions", json={}).status_code == 401
        r = httpx.post(live.url + ROUTE, json=create_body("two", "second"), headers={"x-api-key": "k"})
        assert r.status_code == 200


@pytest.mark.parametrize("method, path, word", [
    ("POST", "/v1/llm/fine-tunes", "fine-tuning"),
    ("GET", "/v1/llm/fine-tunes/ft-1/events", "fine-tuning"),
    ("PUT", "/v1/llm/fine-tunes/ft-1/cancel", "fine-tuning"),
    ("POST", "/v1/files", "file uploads"),
    ("GET", "/v1/files/file-1/content", "file uploads"),
    ("DELETE", "/v1/files/file-1", "file uploads"),
    ("POST", "/v1/docker-image-batch-jobs", "docker image batch jobs"),
    ("GET", "/v1/batch-jobs/job-1", "batch jobs on model bundles"),
    ("POST", "/v2/model-bundles", "model bundles"),
    ("POST", "/v1/llm/model-endpoints/download", "downloading model weights"),
    ("PUT", "/v1/llm/model-endpoints/fake", "delete it (Model.delete) and create it again"),
])
def test_routes_never_served_are_501_with_a_reason(live, method, path, word):
    r = httpx.request(method, live.url + path, json={})
    assert r.status_code == 501 and word in r.json()["detail"], r.text
    assert "not a training or job platform" in r.json()["detail"] or "Model.delete" in r.json()["detail"]


@pytest.mark.slow
def test_a_real_engine_from_a_gguf_is_loaded_used_and_freed(tmp_path):
    """A tiny GGUF is converted once under the cache, served, then unloaded: its engine is collected."""
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_gguf(models / "tiny.gguf")
    refs: list[weakref.ref] = []

    def factory(name, folder, max_model_len):
        engine = AsyncEngine(folder, name=name, kv_cache_gib=0.01, max_model_len=max_model_len)
        refs.append(weakref.ref(engine))
        return engine

    app = create_app({"fake": FakeEngine()}, models_dir=models, batch_dir=tmp_path / "b", engine_factory=factory)
    app.state.model_endpoints.convert_dir = tmp_path / "converted"
    with serve(app) as live:
        r = httpx.post(live.url + ROUTE, json=create_body("tiny", "tiny.gguf", max_model_len=64))
        assert r.status_code == 200, r.text
        assert wait_for(lambda: status(live, "tiny") in ("READY", "UPDATE_FAILED"), timeout=120)
        info = httpx.get(f"{live.url}{ROUTE}/tiny").json()
        assert info["status"] == "READY" and info["max_model_len"] == 64, info
        [converted] = (tmp_path / "converted").iterdir()
        assert converted.name.startswith("tiny-") and (converted / "tokenizer.json").is_file()
        prompt = " ".join(WORDS[:4])
        sync = httpx.post(f"{live.url}/v1/llm/completions-sync?model_endpoint_name=tiny", json=llm_body(prompt, 4))
        assert sync.status_code == 200 and sync.json()["output"]["num_completion_tokens"] == 4, sync.text
        assert httpx.delete(f"{live.url}{ROUTE}/tiny", timeout=30).json() == {"deleted": True}
        assert wait_for(lambda: gc.collect() is not None and refs[0]() is None, timeout=10)
        # a second create reuses the converted folder
        assert httpx.post(live.url + ROUTE, json=create_body("tiny", "tiny.gguf")).status_code == 200
        assert wait_for(lambda: status(live, "tiny") == "READY", timeout=120)
        assert len(list((tmp_path / "converted").iterdir())) == 1
