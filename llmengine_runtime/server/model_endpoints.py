"""Model endpoints, as the official client's `Model.create/get/list/delete` call them:

- `GET /v1/llm/model-endpoints` -> `{"model_endpoints": [...]}`, `GET /v1/llm/model-endpoints/{name}`
- `POST /v1/llm/model-endpoints` (`name`, `checkpoint_path`) loads a model folder (config.json +
  safetensors) or a .gguf file (converted once into `<cache>/llmengine/converted/`) into the running server,
  in a background thread -> `{"endpoint_creation_task_id"}`
- `DELETE /v1/llm/model-endpoints/{name}` unloads a model loaded that way -> `{"deleted": true}`

checkpoint_path must lie under the models directory (`--models-dir`, server/paths.py). While loading, the
endpoint's status is UPDATE_IN_PROGRESS, then READY, or UPDATE_FAILED with the reason in `error`: the
official client accepts only its ModelEndpointStatus values (READY, UPDATE_PENDING, UPDATE_IN_PROGRESS,
UPDATE_FAILED, DELETE_IN_PROGRESS), so those stand for "initializing" and "failed".

Unloading: new requests get 404 at once; requests in flight get `UNLOAD_GRACE` seconds to finish, then end
with an error saying the model was unloaded; the engine shuts down, every reference to it is dropped, and the
freed memory is handed back to the OS (`release_memory`).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request

from llmengine_runtime.models.gguf import convert_gguf
from llmengine_runtime.models.zoo import is_model_dir, models_dir
from llmengine_runtime.server import paths
from llmengine_runtime.server.errors import ApiError, GenerationError, bad_request
from llmengine_runtime.server.schemas import _Body, parse_body
from llmengine_runtime.server.state import ServedEngine, ServerState

log = logging.getLogger("llmengine.server")

LOADING, READY, FAILED = "UPDATE_IN_PROGRESS", "READY", "UPDATE_FAILED"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
UNLOAD_GRACE = 3.0  # seconds requests in flight get to finish when their model is unloaded (the official
# client gives Model.delete 10 s in all)

EngineFactory = Callable[[str, Path, "int | None"], ServedEngine]  # (name, folder, max_model_len) -> engine


def default_engine_factory(name: str, folder: Path, max_model_len: int | None) -> ServedEngine:
    from llmengine_runtime.runtime import AsyncEngine

    return AsyncEngine(folder, name=name, max_model_len=max_model_len)


def release_memory() -> None:
    """Collect the unloaded engine, then give the freed memory back: glibc keeps freed heap pages (a model's
    per-layer weights are heap allocations, below its mmap threshold) until malloc_trim, and PyTorch's CUDA
    allocator keeps freed blocks until empty_cache."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CreateEndpointRequest(_Body):
    """The fields of the official client's CreateLLMEndpointRequest that mean something on one machine;
    the rest (workers, hardware, labels, ...) are ignored."""

    name: str
    model_name: str | None = None
    checkpoint_path: str | None = None
    max_model_len: int | None = None
    num_shards: int | None = 1
    quantize: str | None = None


@dataclass(eq=False)
class Endpoint:
    """A model loaded at run time: loading, ready or failed."""

    name: str
    model_name: str
    checkpoint_path: str  # as given
    checkpoint: Path  # resolved
    max_model_len: int | None
    status: str = LOADING
    error: str | None = None
    task_id: str = field(default_factory=lambda: f"load-{uuid.uuid4().hex}")
    created_at: float = field(default_factory=time.time)
    deleted: bool = False


def endpoint_info(name: str, engine: ServedEngine | None, record: Endpoint | None = None) -> dict[str, Any]:
    return {
        "id": f"end_{name}", "name": name, "model_name": record.model_name if record else name,
        "source": "hugging_face", "status": record.status if record else READY,
        # the official client accepts only deepspeed, text_generation_inference, vllm, lightllm or
        # tensorrt_llm here; ours is a vLLM-style engine (paged KV, continuous batching)
        "inference_framework": "vllm", "inference_framework_tag": "llmengine-runtime",
        "num_shards": 1, "quantize": None, "spec": None, "chat_template_override": None,
        "max_model_len": engine.max_model_len if engine is not None else record.max_model_len if record else None,
        "checkpoint_path": record.checkpoint_path if record else None, "loaded_at_run_time": record is not None,
        "error": record.error if record else None,
    }


class ModelEndpoints:
    def __init__(self, state: ServerState, models_root: Path, factory: EngineFactory,
                 convert_dir: Path | None = None) -> None:
        self.state, self.models_root, self.factory = state, models_root, factory
        self.convert_dir = convert_dir
        self.records: dict[str, Endpoint] = {}
        self._lock = threading.Lock()  # records, and the handover from the load thread to state.engines
        self._convert_lock = threading.Lock()

    # ---- create ----------------------------------------------------------------------------------------
    def create(self, req: CreateEndpointRequest) -> Endpoint:
        self.state.require_ready()
        if not NAME.match(req.name):
            raise bad_request(f"name {req.name!r} is not accepted: 1-100 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
        if req.checkpoint_path is None:
            raise bad_request(f"checkpoint_path is required: a model folder (config.json + *.safetensors) or a "
                              f".gguf file under {self.models_root}; models are not downloaded here")
        if req.quantize is not None:
            raise bad_request(f"quantize={req.quantize!r} is not supported for models loaded at run time")
        if req.num_shards not in (None, 1):
            raise bad_request(f"num_shards={req.num_shards} is not supported: each model runs on one device here")
        if req.max_model_len is not None and req.max_model_len < 1:
            raise bad_request(f"max_model_len={req.max_model_len} is out of range: accepted an integer >= 1")
        checkpoint = paths.checkpoint(req.checkpoint_path, self.models_root)
        record = Endpoint(req.name, req.model_name or req.name, req.checkpoint_path, checkpoint, req.max_model_len)
        with self._lock:
            if req.name in self.records or req.name in self.state.engines:
                what = self.records[req.name].status if req.name in self.records else READY
                raise bad_request(f"a model endpoint named {req.name!r} already exists (status {what}); delete it "
                                  "first or choose another name")
            self.records[req.name] = record
        threading.Thread(target=self._load, args=(record,), name=f"llmengine-load-{req.name}", daemon=True).start()
        return record

    def _converted(self, gguf: Path) -> Path:
        """The GGUF as a model folder under the cache, converted once per file version."""
        stat = gguf.stat()
        digest = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = (self.convert_dir or paths.default_cache_dir() / "converted") / f"{gguf.stem}-{digest}"
        with self._convert_lock:
            if not is_model_dir(target):
                log.info("converting %s into %s", gguf, target)
                convert_gguf(gguf, target, progress=False)
        return target

    def _load(self, record: Endpoint) -> None:
        """The load thread: build and start the engine, then hand it to the server (unless deleted meanwhile)."""
        try:
            folder = self._converted(record.checkpoint) if record.checkpoint.is_file() else record.checkpoint
            engine = self.factory(record.name, folder, record.max_model_len)
            engine.start()
        except Exception as e:  # noqa: BLE001 - any failure is the endpoint's, reported by GET
            log.exception("loading model %s failed", record.name)
            record.status, record.error = FAILED, f"{type(e).__name__}: {e}"
            return
        with self._lock:
            keep = not record.deleted
            if keep:
                try:
                    self.state.add_engine(record.name, engine)
                    record.status = READY
                except ValueError as e:
                    record.status, record.error, keep = FAILED, str(e), False
        if not keep:
            engine.shutdown()
        log.info("model %s %s", record.name, "loaded" if keep else "discarded")

    # ---- delete ----------------------------------------------------------------------------------------
    async def delete(self, name: str) -> None:
        with self._lock:
            record = self.records.pop(name, None)
            if record is not None:
                record.deleted = True
        if record is None:
            if name in self.state.engines:
                raise bad_request(f"model {name!r} was given at start (--model) and cannot be unloaded at run time; "
                                  "restart the server without it")
            raise ApiError(404, f"model endpoint {name!r} does not exist")
        engine = self.state.remove_engine(name)  # None while loading (the load thread discards it) or failed
        if engine is not None:
            await self._unload(name, engine)
            del engine
            await asyncio.to_thread(release_memory)

    async def _unload(self, name: str, engine: ServedEngine) -> None:
        def jobs() -> list:
            return [job for job in self.state.jobs if job.engine is engine]

        deadline = time.monotonic() + UNLOAD_GRACE
        while jobs() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job in jobs():
            job.interrupt(GenerationError(503, f"model {name!r} was unloaded (Model.delete) while this request ran"))
        deadline = time.monotonic() + 1.0
        while jobs() and time.monotonic() < deadline:  # let the routes answer and let go of the engine
            await asyncio.sleep(0.02)
        await asyncio.to_thread(engine.shutdown)

    # ---- read ------------------------------------------------------------------------------------------
    def info(self, name: str) -> dict[str, Any]:
        self.state.require_ready()
        engines = self.state.engines
        record = self.records.get(name)
        if record is None and name not in engines:
            raise ApiError(404, f"model endpoint {name!r} does not exist; endpoints: "
                                f"{', '.join(self.names()) or 'none'}")
        return endpoint_info(name, engines.get(name), record)

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.state.engines, *self.records]))

    def list(self) -> list[dict[str, Any]]:
        self.state.require_ready()
        engines, records = self.state.engines, dict(self.records)
        return [endpoint_info(name, engines.get(name), records.get(name)) for name in self.names()]


def add_routes(app: FastAPI, state: ServerState, models_root: Path | None = None,
               factory: EngineFactory | None = None) -> ModelEndpoints:
    endpoints = ModelEndpoints(state, Path(models_root or models_dir()).expanduser(),
                               factory or default_engine_factory)
    app.state.model_endpoints = endpoints

    @app.get("/v1/llm/model-endpoints")
    async def list_endpoints() -> dict:
        return {"model_endpoints": endpoints.list()}

    @app.get("/v1/llm/model-endpoints/{name}")
    async def get_endpoint(name: str) -> dict:
        return endpoints.info(name)

    @app.post("/v1/llm/model-endpoints")
    async def create_endpoint(request: Request) -> dict:
        req = parse_body(await request.body(), CreateEndpointRequest)
        record = await asyncio.to_thread(endpoints.create, req)  # touches the filesystem
        return {"endpoint_creation_task_id": record.task_id}

    @app.delete("/v1/llm/model-endpoints/{name}")
    async def delete_endpoint(name: str) -> dict:
        await endpoints.delete(name)
        return {"deleted": True}

    return endpoints
