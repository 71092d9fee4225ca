"""Routes of LLM Engine's API that this server will never serve: 501 with a sentence saying why.

This is an inference runtime on one machine, not a training or job platform: there is no fine-tuning, no
file store, no docker batch jobs and no model bundles. The paths are the official client's (fine_tuning.py,
file.py, model.py) and its server's (scaleapi/llm-engine model-engine).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
WHY = "this server is an inference runtime on one machine, not a training or job platform"

UNSUPPORTED: dict[str, str] = {
    "/v1/llm/fine-tunes": f"fine-tuning is not available: {WHY}",
    "/v1/files": f"file uploads are not available: {WHY}; batch jobs read and write files under the "
                 "server's --batch-dir instead",
    "/v1/docker-image-batch-jobs": f"docker image batch jobs are not available: {WHY}; use "
                                   "POST /v1/llm/batch-completions for batch completions",
    "/v1/docker-image-batch-job-bundles": f"docker image batch job bundles are not available: {WHY}",
    "/v1/batch-jobs": f"batch jobs on model bundles are not available: {WHY}; use "
                      "POST /v1/llm/batch-completions for batch completions",
    "/v1/model-bundles": f"model bundles are not available: {WHY}; load a model with POST /v1/llm/model-endpoints",
    "/v2/model-bundles": f"model bundles are not available: {WHY}; load a model with POST /v1/llm/model-endpoints",
    "/v1/model-endpoints": f"generic (non-LLM) model endpoints are not available: {WHY}; use "
                           "/v1/llm/model-endpoints",
    "/v1/triggers": f"cron triggers are not available: {WHY}",
}


def add_routes(app: FastAPI) -> None:
    def refuse(detail: str):
        async def not_served(request: Request) -> JSONResponse:
            return JSONResponse({"detail": detail, "request_id": request.state.request_id}, status_code=501)
        return not_served

    for prefix, detail in UNSUPPORTED.items():
        app.add_api_route(prefix + "{rest:path}", refuse(detail), methods=ALL_METHODS, include_in_schema=False)
    app.add_api_route("/v1/llm/model-endpoints/download", refuse(
        f"downloading model weights is not available: {WHY}; the weights are already on this machine"),
        methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/llm/model-endpoints/{name}", refuse(
        "updating a model endpoint is not supported: delete it (Model.delete) and create it again "
        "(Model.create)"), methods=["PUT", "PATCH"], include_in_schema=False)
