"""Batch completion jobs inside the server: a job is an asyncio task on the server's event loop (not tied
to the HTTP request that made it, so it survives the client going away) that feeds its prompts to a served
engine, collects the completions in prompt order and writes them atomically (server.batch_io).

A job keeps at most `max_in_flight` of its prompts in the engine at a time, so an interactive request
arriving meanwhile queues behind at most that many job prompts instead of the whole batch. Jobs on one
model run one after another (the others are "queued"); jobs on different models run side by side.
Cancelling a job aborts its prompts in the engine at once, which frees their KV blocks.

Jobs live in memory: a restart loses them, and an unknown id is a 404 that says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.server import paths
from llmengine_runtime.server.batch_io import output_record, write_json_atomic
from llmengine_runtime.server.errors import ApiError
from llmengine_runtime.server.generation import FAILED, token_entries
from llmengine_runtime.server.state import ServedEngine, ServerState

log = logging.getLogger("llmengine.server")

MAX_IN_FLIGHT = 4  # job prompts in the engine at once, per job
MAX_UNFINISHED_JOBS = 64  # queued + running; more is a 429
MAX_KEPT_JOBS = 1000  # finished jobs remembered for GET; the oldest are forgotten first
STATUSES = ("queued", "running", "completed", "failed", "cancelled")


class JobFailed(Exception):
    """Ends a job with status "failed" and this message."""


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


@dataclass(eq=False)
class BatchJob:
    model: str
    prompts: list[str]
    params: SamplingParams
    output_path: Path  # resolved, inside `root`
    root: Path  # the batch directory: the output path is checked against it again just before writing
    max_runtime_sec: float
    described: dict[str, Any]  # input_data_path, output_data_path, model_config, priority, labels as given
    job_id: str = field(default_factory=lambda: f"batch-{uuid.uuid4().hex}")
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    completed_at: float | None = None
    completed: int = 0
    total: int = 0
    error: str | None = None
    writing: bool = False  # the output is being written: too late to cancel
    in_flight: set[str] = field(default_factory=set)
    engine: ServedEngine | None = None  # only while running
    task: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self.total = len(self.prompts)
        self.deadline = time.monotonic() + self.max_runtime_sec

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    def view(self) -> dict[str, Any]:
        """The official client's BatchCompletionsJob, plus progress and error."""
        return {"job_id": self.job_id, **self.described, "status": self.status,
                "created_at": iso(self.created_at), "expires_at": iso(self.created_at + self.max_runtime_sec),
                "completed_at": iso(self.completed_at), "metadata": {},
                "progress": {"completed": self.completed, "total": self.total}, "error": self.error}


class BatchRunner:
    def __init__(self, state: ServerState, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.state = state
        self.max_in_flight = max_in_flight
        self.jobs: dict[str, BatchJob] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}

    def submit(self, job: BatchJob) -> BatchJob:
        """Queue `job` (429 if too many are unfinished); it starts as soon as its model is free."""
        unfinished = sum(not j.finished for j in self.jobs.values())
        if unfinished >= MAX_UNFINISHED_JOBS:
            raise ApiError(429, f"{unfinished} batch jobs are queued or running (the limit is "
                                f"{MAX_UNFINISHED_JOBS}); retry when some have finished")
        self._forget_old()
        self.jobs[job.job_id] = job
        job.task = asyncio.create_task(self._run(job), name=job.job_id)
        return job

    def get(self, job_id: str) -> BatchJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"batch job {job_id!r} is not known to this server: jobs live in the server's "
                                "memory, so a restart loses running jobs (and finished ones are forgotten after "
                                f"{MAX_KEPT_JOBS} newer jobs)")
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job: its prompts are aborted in the engine now. False if it has
        finished or is writing its output."""
        job = self.get(job_id)
        if job.finished or job.writing:
            return False
        job.status = "cancelled"
        engine = job.engine
        if engine is not None:
            for request_id in list(job.in_flight):
                engine.abort(request_id)  # frees the KV blocks at the engine's next step, whatever the task does
        if job.task is not None:
            job.task.cancel()
        return True

    def cancel_all(self) -> None:
        """At shutdown: every unfinished job ends (a restart loses them anyway)."""
        for job in list(self.jobs.values()):
            if not job.finished:
                self.cancel(job.job_id)

    def _forget_old(self) -> None:
        done = [j for j in self.jobs.values() if j.finished]
        for job in sorted(done, key=lambda j: j.created_at)[:max(0, len(done) - MAX_KEPT_JOBS + 1)]:
            del self.jobs[job.job_id]

    # ---- running -------------------------------------------------------------------------------------------
    async def _run(self, job: BatchJob) -> None:
        lock = self._model_locks.setdefault(job.model, asyncio.Lock())
        try:
            async with lock:
                if job.finished:  # cancelled while queued
                    return
                job.status = "running"
                job.engine = self.state.engines.get(job.model)
                if job.engine is None:
                    raise JobFailed(f"model {job.model!r} is no longer served")
                results = await self._generate(job, job.engine)
                job.engine, job.writing = None, True
                await asyncio.to_thread(self._write, job, results)
                job.status = "completed"
        except asyncio.CancelledError:
            job.status = "cancelled"  # cancel() or the server shutting down; the task ends here
        except JobFailed as e:
            if job.status != "cancelled":  # a prompt aborted by cancel() is no failure
                job.status, job.error = "failed", str(e)
        except Exception as e:  # a bug, or the output could not be written: the job fails, the server goes on
            log.exception("batch job %s failed", job.job_id)
            job.status, job.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            job.completed_at = time.time()
            job.engine, job.prompts = None, []  # drop the engine reference (a model can be unloaded) and the data

    @staticmethod
    def _write(job: BatchJob, results: list[dict[str, Any]]) -> None:
        try:  # a folder on the way may have been swapped for a symlink since the job was accepted
            output = paths.output_file(str(job.output_path), job.root)
        except ApiError as e:
            raise JobFailed(e.detail) from None
        write_json_atomic(output, results)

    async def _generate(self, job: BatchJob, engine: ServedEngine) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * job.total
        next_index = iter(range(job.total))

        async def worker() -> None:
            for i in next_index:  # shared iterator: each index is taken by one worker
                if self.state.engines.get(job.model) is not engine:
                    raise JobFailed(f"model {job.model!r} was unloaded while the job ran "
                                    f"({job.completed} of {job.total} prompts done)")
                if time.monotonic() >= job.deadline:
                    raise JobFailed(f"the job ran longer than max_runtime_sec={job.max_runtime_sec:g}")
                results[i] = await self._complete(job, engine, i)
                job.completed += 1

        workers = [asyncio.create_task(worker()) for _ in range(min(self.max_in_flight, job.total))]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # one worker failing (or the job being cancelled) ends the others, aborting their prompts
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return results  # type: ignore[return-value]

    async def _complete(self, job: BatchJob, engine: ServedEngine, i: int) -> dict[str, Any]:
        request_id = f"{job.job_id}-{i}"
        try:
            outputs = engine.add_request(job.prompts[i], job.params, request_id=request_id, deadline=job.deadline,
                                         stream=False)
        except ValueError as e:
            raise JobFailed(f"prompt {i}: {e}") from None
        except RuntimeError as e:  # the engine is shutting down (unloaded)
            raise JobFailed(f"model {job.model!r}: {e}") from None
        job.in_flight.add(request_id)
        text: list[str] = []
        tokens: list[tuple[str, float]] = []
        finished = False
        try:
            async for out in outputs:
                text.append(out.text)
                tokens.extend(token_entries(out))
                if out.finished:
                    finished = True
                    if out.finish_reason == "timeout":
                        raise JobFailed(f"the job ran longer than max_runtime_sec={job.max_runtime_sec:g}")
                    if out.finish_reason in FAILED:
                        if self.state.engines.get(job.model) is not engine:
                            raise JobFailed(f"model {job.model!r} was unloaded while the job ran")
                        message = FAILED[out.finish_reason][1]
                        raise JobFailed(f"prompt {i}: {message}" + (f": {out.error}" if out.error else ""))
                    return output_record("".join(text), out.num_prompt_tokens, out.num_completion_tokens,
                                         tokens if job.params.return_token_log_probs else None)
            raise JobFailed(f"prompt {i}: the engine ended the request without finishing it")
        finally:
            job.in_flight.discard(request_id)
            if not finished:
                engine.abort(request_id)
            close = getattr(outputs, "aclose", None)
            if close is not None:
                await close()  # let the stream end now, not when it is garbage-collected
