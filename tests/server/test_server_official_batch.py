"""The official LLM Engine client, unchanged (in a subprocess: official_client_batch_check.py), against the
default model: `Completion.batch_create` (v1 and v2) writes the same completions as one request per prompt
(greedy), `get_batch_completion` and `cancel_batch_completion` (which frees the job's KV blocks), and a
second copy of the model loaded with `Model.create`, used, and removed with `Model.delete`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from live_server import MODEL, llm_body, serve, wait_for
from test_server_clients import OFFICIAL, needs_official

from llmengine_runtime.runtime import AsyncEngine
from llmengine_runtime.server.app import create_app

HERE = Path(__file__).resolve().parent
PROMPTS = ["Suggest a name for an icecream shop", "The capital of France is", "def fibonacci(n):",
           "Write a haiku about the sea.", "1, 2, 3, 4,", "Once upon a time"]


class Borrowed:
    """The session's engine, served by a second app (with its own batch and models folders) that must not
    shut it down at its end."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def shutdown(self, timeout: float = 5.0) -> None:
        pass


def second_copy(name: str, folder: Path, max_model_len: int | None) -> AsyncEngine:
    return AsyncEngine(folder, name=name, kv_cache_gib=0.05, max_model_len=max_model_len)


@needs_official
def test_official_client_batch_jobs_and_run_time_models(real_engine, default_model_dir, tmp_path):
    app = create_app({MODEL: Borrowed(real_engine)}, batch_dir=tmp_path, models_dir=default_model_dir.parent,
                     engine_factory=second_copy)
    with serve(app) as live:
        env = {**os.environ, "PYTHONPATH": str(OFFICIAL), "LLM_ENGINE_BASE_PATH": live.url + "/",
               "LLM_ENGINE_DISABLE_VERSION_CHECK": "true"}
        env.pop("SCALE_API_KEY", None)
        proc = subprocess.run([sys.executable, str(HERE / "official_client_batch_check.py"), MODEL,
                               json.dumps(PROMPTS), default_model_dir.name], env=env, capture_output=True, text=True,
                              timeout=900, cwd=HERE)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        one_by_one = [httpx.post(f"{live.url}/v1/llm/completions-sync?model_endpoint_name={MODEL}",
                                 json=llm_body(p, 12), timeout=120).json()["output"] for p in PROMPTS]
        assert wait_for(lambda: real_engine.stats()["blocks_used"] == 0)  # the cancelled job left nothing behind

    batch, models = got["batch"], got["models"]
    expected = [{**o, "tokens": None} for o in one_by_one]
    for version in ("v1", "v2"):
        job = batch[f"{version}_job"]
        assert job["status"] == "completed" and job["progress"] == {"completed": 6, "total": 6}, job
        assert json.loads((tmp_path / "official" / f"{version}.json").read_text()) == expected
    assert batch["v2_created"]["status"] in ("queued", "running")
    assert batch["v2_created"]["output_data_path"] == "official/v2.json"
    assert batch["cancel"]["success"] is True and batch["cancelled_job"]["status"] == "cancelled"
    assert batch["cancelled_job"]["progress"]["completed"] < 300
    assert not (tmp_path / "official" / "cancelled.json").exists()
    assert batch["s3_output"].startswith("BadRequestError") and "is a URL" in batch["s3_output"]
    assert batch["escape"].startswith("BadRequestError") and "outside the allowed directory" in batch["escape"]
    assert batch["unknown_job"].startswith("NotFoundError") and "restart" in batch["unknown_job"]

    assert models["created"]["endpoint_creation_task_id"]
    assert models["statuses"][-1] == "READY" and set(models["statuses"]) <= {"UPDATE_IN_PROGRESS", "READY"}
    assert models["listed"] == [MODEL, "second"]
    assert models["text"] == one_by_one[0]["text"][:len(models["text"])] and models["text"]  # same weights
    assert models["duplicate"].startswith("BadRequestError") and "'second' already exists" in models["duplicate"]
    assert models["outside"].startswith("BadRequestError") and "outside the allowed directory" in models["outside"]
    assert models["deleted"] == {"deleted": True}
    assert models["after_delete"].startswith("NotFoundError")
    assert models["complete_after_delete"].startswith("NotFoundError")
