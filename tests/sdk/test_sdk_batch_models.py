"""The SDK's batch jobs (``Completion.batch_create`` / ``get_batch_completion`` / ``cancel_batch_completion``)
and run-time models (``Model.create`` / ``Model.delete``) against our server with fake engines, with the
official client's argument names."""

from __future__ import annotations

import json
import time

import pydantic
import pytest
from llmengine import (
    BadRequestError,
    BatchCompletionsJob,
    Completion,
    CreateBatchCompletionsModelConfig,
    CreateBatchCompletionsRequestContent,
    CreateBatchCompletionsV1Response,
    Model,
    NotFoundError,
    ValidationError,
    api_engine,
)

from llmengine_runtime.server.app import create_app
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import serve


def fake_factory(name, folder, max_model_len):
    return FakeEngine(name=name, delay=0.002)


@pytest.fixture
def live(tmp_path, monkeypatch):
    monkeypatch.delenv("SCALE_API_KEY", raising=False)
    engine = FakeEngine(delay=0.002)
    (tmp_path / "models" / "second").mkdir(parents=True)  # passes the checkpoint check; the fake loads nothing
    (tmp_path / "models" / "second" / "config.json").write_text("{}")
    (tmp_path / "models" / "second" / "model.safetensors").write_bytes(b"")
    app = create_app({"fake": engine}, batch_dir=tmp_path / "batch", models_dir=tmp_path / "models",
                     engine_factory=fake_factory)
    with serve(app) as live:
        api_engine.set_base_path(live.url)
        api_engine.set_api_key(None)
        live.engine, live.dir = engine, tmp_path / "batch"
        yield live
    api_engine.set_base_path(None)


def wait_job(job_id: str) -> dict:
    deadline = time.monotonic() + 30
    while (job := Completion.get_batch_completion(job_id)["job"])["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job


def test_batch_create_v1_and_status(live):
    response = Completion.batch_create(
        output_data_path="out.json", model_config=CreateBatchCompletionsModelConfig(model="fake"),
        content=CreateBatchCompletionsRequestContent(prompts=["a b", "c"], max_new_tokens=2, temperature=0.0))
    assert isinstance(response, CreateBatchCompletionsV1Response) and response.job_id
    job = wait_job(response.job_id)
    assert job["status"] == "completed" and job["progress"] == {"completed": 2, "total": 2}
    assert json.loads((live.dir / "out.json").read_text()) == [
        {"text": " w0 w1", "num_prompt_tokens": 2, "num_completion_tokens": 2, "tokens": None},
        {"text": " w0 w1", "num_prompt_tokens": 1, "num_completion_tokens": 2, "tokens": None}]


def test_batch_create_v2_from_a_file_and_cancel(live):
    live.engine.delay = 0.05
    (live.dir / "in.json").write_text(json.dumps({"prompts": ["a"] * 30, "max_new_tokens": 20, "temperature": 0}))
    job = Completion.batch_create(output_data_path="out.json", model_config={"model": "fake"},
                                  input_data_path="in.json", use_v2=True)
    assert isinstance(job, BatchCompletionsJob) and job.status in ("queued", "running")
    assert job.dict()["model_config"]["model"] == "fake" and job.input_data_path == "in.json"
    assert job.progress.total == 30
    cancelled = Completion.cancel_batch_completion(job.job_id)
    assert cancelled == {"success": True, "status": "cancelled"}
    assert wait_job(job.job_id)["status"] == "cancelled"
    assert live.engine.stats()["blocks_used"] == 0 and not (live.dir / "out.json").exists()


def test_batch_errors(live):
    config = CreateBatchCompletionsModelConfig(model="fake")
    content = CreateBatchCompletionsRequestContent(prompts=["a"], max_new_tokens=1, temperature=0.0)
    with pytest.raises(BadRequestError, match="is a URL"):
        Completion.batch_create(output_data_path="s3://bucket/o.json", model_config=config, content=content)
    with pytest.raises(BadRequestError, match="outside the allowed directory"):
        Completion.batch_create(output_data_path="../o.json", model_config=config, content=content)
    with pytest.raises(NotFoundError, match="not served"):
        Completion.batch_create(output_data_path="o.json", model_config={"model": "nope"}, content=content)
    with pytest.raises(NotFoundError, match="restart"):
        Completion.get_batch_completion("batch-unknown")
    with pytest.raises(NotFoundError):
        Completion.cancel_batch_completion("batch-unknown")
    with pytest.raises(ValidationError, match="either content or input_data_path"):
        Completion.batch_create(output_data_path="o.json", model_config=config)
    with pytest.raises(pydantic.ValidationError, match="temperature"):
        CreateBatchCompletionsRequestContent(prompts=["a"], max_new_tokens=1, temperature=2.0)
    assert live.engine.requests == []


def test_model_create_get_delete(live):
    created = Model.create(name="second", model="base", inference_framework_image_tag="latest",
                           checkpoint_path="second")
    assert created.endpoint_creation_task_id.startswith("load-")
    deadline = time.monotonic() + 30
    while Model.get("second").status != "READY":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert [e.name for e in Model.list().model_endpoints] == ["fake", "second"]
    assert Completion.create(model="second", prompt="a", max_new_tokens=2, temperature=0.0).output.text == " w0 w1"
    with pytest.raises(BadRequestError, match="already exists"):
        Model.create(name="second", model="base", checkpoint_path="second")
    with pytest.raises(BadRequestError, match="outside the allowed directory"):
        Model.create(name="third", model="base", checkpoint_path="/etc")
    deleted = Model.delete("second")
    assert deleted.deleted is True and deleted.dict() == {"deleted": True}
    with pytest.raises(NotFoundError):
        Model.get("second")
    with pytest.raises(NotFoundError):
        Model.delete("second")
