"""Batch completion routes, as the official client's `Completion.batch_create` (v1 and v2),
`get_batch_completion` and `cancel_batch_completion` call them:

- `POST /v1/llm/batch-completions` -> `{"job_id"}`; `POST /v2/batch-completions` -> the job object
- `GET /v2/batch-completions` -> `{"jobs": [...]}`; `GET /v2/batch-completions/{id}` -> `{"job": {...}}`
- `POST /v2/batch-completions/{id}/actions/cancel` -> `{"success": bool}`

The body names a served model (`model_config.model`), the prompts (`content`, or `input_data_path` to a
JSON file of the same shape) and `output_data_path`. Both paths are confined to the batch directory
(`--batch-dir`, server/paths.py). The job itself runs in server/batch_jobs.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import Field

from llmengine_runtime.server import paths
from llmengine_runtime.server.batch_io import (
    BatchContent,
    BatchInputError,
    parse_content,
    read_content,
    sampling_params,
)
from llmengine_runtime.server.batch_jobs import BatchJob, BatchRunner
from llmengine_runtime.server.errors import ApiError, bad_request
from llmengine_runtime.server.schemas import _Body, parse_body
from llmengine_runtime.server.state import ServerState

MAX_RUNTIME_SEC = 2 * 24 * 3600  # the official client's upper bound


class BatchModelConfig(_Body):
    model: str
    checkpoint_path: str | None = None


class BatchRequest(_Body):
    """`CreateBatchCompletionsV1Request` / `V2Request`; hardware fields (gpus, data_parallelism, ...) and
    labels mean nothing on one machine and are ignored."""

    output_data_path: str
    model_cfg: BatchModelConfig = Field(alias="model_config")
    content: Any = None
    input_data_path: str | None = None
    max_runtime_sec: int | None = 24 * 3600
    tool_config: Any = None
    priority: str | None = None


def default_batch_dir() -> Path:
    return paths.default_cache_dir() / "batch"


def add_routes(app: FastAPI, state: ServerState, batch_dir: Path | None = None) -> BatchRunner:
    root = Path(batch_dir or default_batch_dir()).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    runner = BatchRunner(state)
    app.state.batch = runner

    def load_content(req: BatchRequest) -> tuple[BatchContent, Path | None]:
        if req.content is not None and req.input_data_path is not None:
            raise bad_request("give either content or input_data_path, not both")
        if req.content is None and req.input_data_path is None:
            raise bad_request("give content (prompts and sampling parameters) or input_data_path (a JSON file "
                              f"of the same shape under {root})")
        if isinstance(req.content, list):
            raise bad_request("content as a list of v2 completion or chat requests is not supported; give "
                              "{prompts, max_new_tokens, temperature, ...} (CreateBatchCompletionsRequestContent)")
        try:
            if req.content is not None:
                return parse_content(req.content, "content"), None
            source = paths.input_file(req.input_data_path, root)
            return read_content(source, "input_data_path"), source
        except BatchInputError as e:
            raise bad_request(str(e)) from None

    async def create(request: Request) -> BatchJob:
        req = parse_body(await request.body(), BatchRequest)
        if state.draining:
            raise ApiError(503, "the server is shutting down")
        state.engine(req.model_cfg.model)  # 503 still loading, 404 not served
        if req.model_cfg.checkpoint_path is not None:
            raise bad_request("model_config.checkpoint_path is not supported: batch jobs run on a served model; "
                              "load the checkpoint first (Model.create), then name it in model_config.model")
        if req.tool_config is not None:
            raise bad_request("tool_config is not supported: batch jobs here only complete prompts")
        runtime = 24 * 3600 if req.max_runtime_sec is None else req.max_runtime_sec
        if not 1 <= runtime <= MAX_RUNTIME_SEC:
            raise bad_request(f"max_runtime_sec={runtime} is out of range: accepted 1 to {MAX_RUNTIME_SEC}")
        output = paths.output_file(req.output_data_path, root)
        content, source = await asyncio.to_thread(load_content, req)
        if source == output:
            raise bad_request("output_data_path must differ from input_data_path")
        try:
            params = sampling_params(content)
        except BatchInputError as e:
            raise bad_request(str(e)) from None
        described = {"input_data_path": req.input_data_path, "output_data_path": req.output_data_path,
                     "model_config": (await request.json())["model_config"], "priority": req.priority}
        return runner.submit(BatchJob(req.model_cfg.model, content.prompts, params, output, root, runtime, described))

    @app.post("/v1/llm/batch-completions")
    async def create_v1(request: Request) -> dict:
        return {"job_id": (await create(request)).job_id}

    @app.post("/v2/batch-completions")
    async def create_v2(request: Request) -> dict:
        return (await create(request)).view()

    @app.get("/v2/batch-completions")
    async def list_jobs() -> dict:
        return {"jobs": [job.view() for job in runner.jobs.values()]}

    @app.get("/v2/batch-completions/{job_id}")
    async def get_job(job_id: str) -> dict:
        return {"job": runner.get(job_id).view()}

    @app.post("/v2/batch-completions/{job_id}/actions/cancel")
    async def cancel_job(job_id: str) -> dict:
        success = runner.cancel(job_id)
        return {"success": success, "status": runner.get(job_id).status}

    return runner
