"""Batch completion jobs (server/batch_api.py, batch_jobs.py) over real HTTP with the fake engine: output
files in prompt order and written atomically, at most a few job prompts in the engine at a time, v2 status
and cancel (which frees the blocks at once), confined paths, and a clear 4xx for each kind of bad request."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from fake_engine import FakeEngine
from live_server import serve, wait_for

from llmengine_runtime.server import paths
from llmengine_runtime.server.app import create_app
from llmengine_runtime.server.batch_jobs import MAX_IN_FLIGHT


class CountingEngine(FakeEngine):
    """Records the most requests it held at once."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.most_in_flight = 0

    def add_request(self, prompt, params, request_id=None, deadline=None, stream=True):
        outputs = super().add_request(prompt, params, request_id, deadline, stream)
        with self._lock:
            self.most_in_flight = max(self.most_in_flight, len(self._blocks))
        return outputs


def content(prompts: list[str], max_new_tokens: int = 3, **overrides) -> dict:
    """`CreateBatchCompletionsRequestContent` as the official client sends it (nulls included)."""
    body = {"prompts": prompts, "max_new_tokens": max_new_tokens, "temperature": 0.0, "stop_sequences": None,
            "return_token_log_probs": False, "presence_penalty": None, "frequency_penalty": None, "top_k": None,
            "top_p": None, "skip_special_tokens": True}
    return {**body, **overrides}


def batch_body(output: str, prompts: list[str] | None = None, model: str = "fake", **overrides) -> dict:
    body = {"output_data_path": output, "input_data_path": None,
            "content": content(prompts) if prompts is not None else None,
            "model_config": {"model": model, "checkpoint_path": None, "num_shards": 1, "labels": {}},
            "data_parallelism": 1, "max_runtime_sec": 86400, "tool_config": None}
    return {**body, **overrides}


@pytest.fixture
def live(tmp_path):
    engine = CountingEngine(delay=0.002)
    (tmp_path / "batch").mkdir()
    with serve(create_app({"fake": engine}, batch_dir=tmp_path / "batch")) as live:
        live.engine, live.dir = engine, tmp_path / "batch"
        yield live


def job_status(live, job_id: str) -> dict:
    r = httpx.get(f"{live.url}/v2/batch-completions/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()["job"]


def wait_done(live, job_id: str, timeout: float = 30) -> dict:
    assert wait_for(lambda: job_status(live, job_id)["status"] not in ("queued", "running"), timeout)
    return job_status(live, job_id)


def test_v1_inline_prompts_write_outputs_in_prompt_order(live):
    prompts = [" ".join(["x"] * (i % 5 + 1)) for i in range(23)]
    r = httpx.post(live.url + "/v1/llm/batch-completions", json=batch_body("out.json", prompts))
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"job_id"}
    job = wait_done(live, r.json()["job_id"])
    assert job["status"] == "completed" and job["error"] is None
    assert job["progress"] == {"completed": 23, "total": 23} and job["completed_at"]
    out = json.loads((live.dir / "out.json").read_text())
    assert out == [{"text": " w0 w1 w2", "num_prompt_tokens": i % 5 + 1, "num_completion_tokens": 3, "tokens": None}
                   for i in range(23)]
    assert 1 < live.engine.most_in_flight <= MAX_IN_FLIGHT  # bounded, but more than one at a time
    assert [p for p, _ in live.engine.requests] == prompts
    assert not [p for p in live.dir.iterdir() if p.name != "out.json"]  # no temporary file left behind


def test_v2_from_input_file_with_log_probs(live):
    (live.dir / "in").mkdir()
    (live.dir / "in" / "prompts.json").write_text(json.dumps(content(["a b", "c"], 2, return_token_log_probs=True)))
    body = batch_body("results/deep/out.json", input_data_path="in/prompts.json")
    r = httpx.post(live.url + "/v2/batch-completions", json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["job_id"].startswith("batch-")
    assert job["input_data_path"] == "in/prompts.json" and job["output_data_path"] == "results/deep/out.json"
    assert job["model_config"]["model"] == "fake" and job["created_at"] and job["expires_at"]
    assert wait_done(live, job["job_id"])["status"] == "completed"
    out = json.loads((live.dir / "results" / "deep" / "out.json").read_text())
    assert [o["text"] for o in out] == [" w0 w1", " w0 w1"]
    assert out[0]["tokens"] == [{"token": " w0", "log_prob": -0.5}, {"token": " w1", "log_prob": -1.0}]
    listed = httpx.get(live.url + "/v2/batch-completions").json()["jobs"]
    assert [j["job_id"] for j in listed] == [job["job_id"]]


def test_cancel_aborts_in_flight_prompts_and_frees_blocks(live):
    live.engine.delay = 0.05
    r = httpx.post(live.url + "/v2/batch-completions", json=batch_body("never.json", ["a b c"] * 40))
    job_id = r.json()["job_id"]
    assert wait_for(lambda: live.engine.stats()["blocks_used"] > 0)
    assert not (live.dir / "never.json").exists()  # nothing at the output path while the job runs
    r = httpx.post(f"{live.url}/v2/batch-completions/{job_id}/actions/cancel", json={})
    assert r.status_code == 200 and r.json()["success"] is True
    assert live.engine.stats()["blocks_used"] == 0  # aborted before the answer: the blocks are free already
    assert [rid for rid in live.engine.aborts if rid.startswith(job_id)]
    job = job_status(live, job_id)
    assert job["status"] == "cancelled" and job["progress"]["completed"] < 40
    n_requests = len(live.engine.requests)
    assert not wait_for(lambda: len(live.engine.requests) > n_requests, timeout=0.5)  # no new prompt after
    assert not (live.dir / "never.json").exists() and not list(live.dir.iterdir())
    again = httpx.post(f"{live.url}/v2/batch-completions/{job_id}/actions/cancel", json={})
    assert again.json() == {"success": False, "status": "cancelled"}


def test_the_output_appears_whole_or_not_at_all(live):
    live.engine.delay = 0.01
    (live.dir / "out.json").write_text("old")
    r = httpx.post(live.url + "/v1/llm/batch-completions", json=batch_body("out.json", ["a"] * 30))
    job_id = r.json()["job_id"]
    seen = set()
    while job_status(live, job_id)["status"] in ("queued", "running"):
        seen.add((live.dir / "out.json").read_text()[:5])
    final = (live.dir / "out.json").read_text()
    assert seen <= {"old", final[:5]}
    assert len(json.loads(final)) == 30


def test_a_folder_swapped_for_a_symlink_while_the_job_runs_is_refused_at_write_time(live, tmp_path):
    live.engine.delay = 0.02
    (live.dir / "sub").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    job_id = httpx.post(live.url + "/v1/llm/batch-completions",
                        json=batch_body("sub/out.json", ["a"] * 12)).json()["job_id"]
    (live.dir / "sub").rmdir()
    os.symlink(outside, live.dir / "sub")
    job = wait_done(live, job_id)
    assert job["status"] == "failed" and "outside the allowed directory" in job["error"]
    assert list(outside.iterdir()) == []


def test_a_job_survives_its_client(live):
    with httpx.Client() as client:
        job_id = client.post(live.url + "/v1/llm/batch-completions", json=batch_body("o.json", ["a"] * 8)).json()
    assert wait_done(live, job_id["job_id"])["status"] == "completed"


def test_unknown_job_is_a_404_that_mentions_restarts(live):
    for r in (httpx.get(f"{live.url}/v2/batch-completions/batch-nope"),
              httpx.post(f"{live.url}/v2/batch-completions/batch-nope/actions/cancel", json={})):
        assert r.status_code == 404
        assert "batch-nope" in r.json()["detail"] and "restart" in r.json()["detail"]


@pytest.mark.parametrize("prompts, detail", [
    (["a b", "one two three four five six seven eight"], "prompt 1:"),  # too long for the context
    (["a", "fail-after 1 x"], "prompt 1: the engine failed: boom"),
])
def test_a_prompt_that_fails_fails_the_job_with_its_index(tmp_path, prompts, detail):
    engine = FakeEngine(delay=0.001, max_model_len=10)
    with serve(create_app({"fake": engine}, batch_dir=tmp_path)) as live:
        body = batch_body("o.json", prompts)
        body["content"]["max_new_tokens"] = 3
        job_id = httpx.post(live.url + "/v1/llm/batch-completions", json=body).json()["job_id"]
        job = wait_done(live, job_id)
        assert job["status"] == "failed" and detail in job["error"]
        assert not (tmp_path / "o.json").exists()
        assert wait_for(lambda: engine.stats()["blocks_used"] == 0)


@pytest.mark.slow
def test_max_runtime_sec_ends_the_job(live):
    live.engine.delay = 0.05
    body = batch_body("o.json", ["a"] * 40, max_runtime_sec=1)
    body["content"]["max_new_tokens"] = 10
    job_id = httpx.post(live.url + "/v1/llm/batch-completions", json=body).json()["job_id"]
    job = wait_done(live, job_id)
    assert job["status"] == "failed" and "max_runtime_sec=1" in job["error"]


# ---- bad requests: each its own clear 4xx --------------------------------------------------------------------
def bad_path_cases(root: Path, outside: Path) -> list[tuple[dict, str]]:
    (outside / "secret.json").write_text(json.dumps(content(["a"])))
    os.symlink(outside, root / "link-out")
    os.symlink(outside / "secret.json", root / "file-link-out.json")
    inline = {"content": content(["a"])}
    return [
        ({"output_data_path": "../escape.json", **inline}, "outside the allowed directory"),
        ({"output_data_path": "a/../../escape.json", **inline}, "outside the allowed directory"),
        ({"output_data_path": str(outside / "abs.json"), **inline}, "outside the allowed directory"),
        ({"output_data_path": "link-out/x.json", **inline}, "outside the allowed directory"),
        ({"output_data_path": "s3://bucket/out.json", **inline}, "is a URL"),
        ({"output_data_path": "http://example.com/out.json", **inline}, "is a URL"),
        ({"output_data_path": "file:///tmp/out.json", **inline}, "is a URL"),
        ({"output_data_path": ".", **inline}, "is a directory"),
        ({"output_data_path": "", **inline}, "output_data_path is missing or empty"),
        ({"output_data_path": "o.json", "input_data_path": str(outside / "secret.json")}, "outside the allowed"),
        ({"output_data_path": "o.json", "input_data_path": "file-link-out.json"}, "outside the allowed"),
        ({"output_data_path": "o.json", "input_data_path": "link-out/secret.json"}, "outside the allowed"),
        ({"output_data_path": "o.json", "input_data_path": "s3://bucket/in.json"}, "is a URL"),
        ({"output_data_path": "o.json", "input_data_path": "missing.json"}, "is not a file"),
    ]


def test_paths_outside_the_batch_dir_are_refused(live, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    with httpx.Client(base_url=live.url) as client:
        for overrides, detail in bad_path_cases(live.dir, outside):
            body = {**batch_body("x"), **overrides}
            for route in ("/v1/llm/batch-completions", "/v2/batch-completions"):
                r = client.post(route, json=body)
                assert r.status_code == 400, (overrides, r.text)
                assert detail in r.json()["detail"] and str(live.dir) in r.json()["detail"], (overrides, r.text)
    assert not (tmp_path / "escape.json").exists() and [p.name for p in outside.iterdir()] == ["secret.json"]
    assert live.engine.requests == []


def test_bad_bodies_and_input_files(live, monkeypatch):
    (live.dir / "bad.json").write_text("{not json")
    (live.dir / "list.json").write_text("[1, 2]")
    (live.dir / "big.json").write_text(json.dumps(content(["a"] * 100)))
    monkeypatch.setattr(paths, "MAX_INPUT_BYTES", 100)
    cases = [
        (batch_body("o.json", ["a"], model="nope"), 404, "'nope' is not served"),
        (batch_body("o.json"), 400, "give content"),
        (batch_body("o.json", ["a"], input_data_path="big.json"), 400, "not both"),
        (batch_body("o.json", input_data_path="bad.json"), 400, "is not valid JSON"),
        (batch_body("o.json", input_data_path="list.json"), 400, "must be a JSON object"),
        (batch_body("o.json", input_data_path="big.json"), 400, "the limit is 100 bytes"),
        (batch_body("o.json", []), 400, "prompts is empty"),
        (batch_body("o.json", ["a", ""]), 400, "prompts [1] are empty"),
        ({**batch_body("o.json", ["a"]), "content": content(["a"], temperature=3.0)}, 400, "temperature"),
        ({**batch_body("o.json", ["a"]), "content": content(["a"], max_new_tokens=0)}, 400, "max_new_tokens"),
        ({**batch_body("o.json", ["a"]), "content": {"prompts": "a"}}, 400, "invalid content: prompts"),
        ({**batch_body("o.json", ["a"]), "content": [{"prompt": "a"}]}, 400, "list of v2"),
        ({**batch_body("o.json", ["a"]), "model_config": {"model": "fake", "checkpoint_path": "s3://x"}}, 400,
         "checkpoint_path is not supported"),
        (batch_body("o.json", ["a"], tool_config={"name": "code_evaluator"}), 400, "tool_config"),
        (batch_body("o.json", ["a"], max_runtime_sec=0), 400, "max_runtime_sec"),
        ({"output_data_path": "o.json"}, 400, "model_config"),
    ]
    with httpx.Client(base_url=live.url) as client:
        for body, status, detail in cases:
            r = client.post("/v1/llm/batch-completions", json=body)
            assert r.status_code == status and detail in r.json()["detail"], (body, r.text)
    assert live.engine.requests == [] and not (live.dir / "o.json").exists()


def test_batch_dir_is_created_and_relative_paths_stay_in_it(tmp_path):
    root = tmp_path / "made" / "here"
    with serve(create_app({"fake": FakeEngine(delay=0.001)}, batch_dir=root)) as live:
        assert root.is_dir()
        job_id = httpx.post(live.url + "/v1/llm/batch-completions", json=batch_body("x/o.json", ["a"])).json()
        assert wait_done(live, job_id["job_id"])["status"] == "completed"
    assert (root / "x" / "o.json").is_file()
