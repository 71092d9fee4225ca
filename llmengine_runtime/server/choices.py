"""OpenAI's `n` and batches of prompts: the engine requests behind one HTTP request, admitted, watched and ended
together.

    group = start_choices(state, request, model, prompts, params, n)
    try:
        async for index, out in group.outputs():  # deltas of every choice, as they come
            ...
    finally:
        group.close()

Choice `index = i * n + j` is sample j of prompt i (vLLM's order). Each is its own engine request
(`<request id>-<index>` when there is more than one), with its own seed derived from the request's (`seed + j`), so
one seeded request always gives the same n choices of a prompt. All are admitted before any answer is read, so
they batch, and all or none: a refusal of one (429, or a 400 naming the prompt's index) ends those already
admitted. One task watches the client's connection for all of them. When the client leaves, or one choice fails,
`outputs()` raises and `close()` aborts every choice still running, so none keeps its KV blocks.

`state.finish_job(group)` closes a group too, which is how `sse.open_stream` ends a streamed one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from llmengine_runtime.runtime import RequestOutput, SamplingParams
from llmengine_runtime.server.errors import ApiError
from llmengine_runtime.server.generation import Job
from llmengine_runtime.server.state import ServerState

MAX_N = 16
SEED_SPACE = 2 ** 64  # torch seeds are taken modulo 2**64


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The sampling parameters of each of n choices: the same, but the seed `seed + i` (mod 2**64), so choice
    0 is what the same request with n=1 gives."""
    seed = params.seed
    return [dataclasses.replace(params, stop_sequences=list(params.stop_sequences),
                                seed=seed if seed is None or i == 0 else (seed + i) % SEED_SPACE)
            for i in range(n)]


class ChoiceGroup:
    def __init__(self, state: ServerState, request: Request, n: int = 1) -> None:
        self.state = state
        self.n = n  # choices per prompt: job `index` is sample index % n of prompt index // n
        self.jobs: list[Job] = []
        self._gone = asyncio.Event()
        self._watch_task = asyncio.create_task(self._watch(request.receive))
        self._closed = False

    async def _watch(self, receive: Callable) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._gone.set()

    async def client_gone(self) -> dict:
        """Each job's `receive`: answers once the client has left."""
        await self._gone.wait()
        return {"type": "http.disconnect"}

    def prompt_jobs(self) -> list[list[Job]]:
        return [self.jobs[i:i + self.n] for i in range(0, len(self.jobs), self.n)]

    @property
    def num_prompt_tokens(self) -> int:
        """Each prompt counted once, however many choices it has."""
        return sum(max(job.num_prompt_tokens for job in jobs) for jobs in self.prompt_jobs())

    @property
    def num_completion_tokens(self) -> int:
        return sum(job.num_completion_tokens for job in self.jobs)

    def usage(self) -> dict:
        """OpenAI's usage object: each prompt counted once, the completions of every choice, and (vLLM's
        prompt_tokens_details) the prompt tokens the prefix cache held."""
        prompt, completion = self.num_prompt_tokens, self.num_completion_tokens
        cached = sum(max(job.num_cached_tokens for job in jobs) for jobs in self.prompt_jobs())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def choice_usage(self, index: int) -> dict:
        """vLLM's continuous_usage_stats: one choice's usage so far."""
        job = self.jobs[index]
        prompt, completion = job.num_prompt_tokens, job.num_completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, delta) for every choice until all have finished. Raises ClientGone or
        GenerationError (the first choice that fails) at once; the caller then closes the group."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: Job) -> None:
            try:
                async for out in job.outputs():
                    queue.put_nowait((index, out))
                queue.put_nowait((index, None))
            except Exception as e:  # ClientGone, GenerationError: handed to the reader
                queue.put_nowait((index, e))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(self.jobs)]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    def close(self) -> None:
        """Abort every choice that has not finished and forget them; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._watch_task.cancel()
        for job in self.jobs:
            self.state.finish_job(job)


def start_choices(state: ServerState, request: Request, model: str, prompts: list[str | list[int]],
                  params: SamplingParams, n: int, stream: bool = True) -> ChoiceGroup:
    """Admit n engine requests per prompt, all or none (a refusal of one, 429 or 400, ends those already admitted;
    with several prompts a 400 names the prompt's index)."""
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n={n} is out of range: accepted 1 to {MAX_N}")
    group = ChoiceGroup(state, request, n)
    base_id = request.state.request_id
    single = len(prompts) * n == 1
    try:
        for i, prompt in enumerate(prompts):
            for j, choice in enumerate(choice_params(params, n)):
                index = i * n + j
                try:
                    group.jobs.append(state.start_job(request, model, prompt, choice,
                                                      request_id=base_id if single else f"{base_id}-{index}",
                                                      receive=group.client_gone, stream=stream))
                except ApiError as e:
                    if e.status != 400 or len(prompts) == 1:
                        raise
                    raise ApiError(400, f"prompt[{i}]: {e.detail}") from None
    except BaseException:
        group.close()
        raise
    return group
