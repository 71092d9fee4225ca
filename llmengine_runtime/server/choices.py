"""OpenAI's `n`: the n engine requests behind one HTTP request, admitted, watched and ended together.

    group = start_choices(state, request, model, prompt, params, n)
    try:
        async for index, out in group.outputs():  # deltas of all n choices, as they come
            ...
    finally:
        group.close()

Each choice is its own engine request (`<request id>-<i>` when n > 1), with its own seed derived from the
request's (`seed + i`), so one seeded request always gives the same n choices. One task watches the
client's connection for all of them. When the client leaves, or one choice fails, `outputs()` raises and
`close()` aborts every choice still running, so none keeps its KV blocks.

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
    def __init__(self, state: ServerState, request: Request) -> None:
        self.state = state
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

    @property
    def num_prompt_tokens(self) -> int:
        return max((job.num_prompt_tokens for job in self.jobs), default=0)

    @property
    def num_completion_tokens(self) -> int:
        return sum(job.num_completion_tokens for job in self.jobs)

    def usage(self) -> dict:
        """OpenAI's usage object: the prompt counted once, the completions of every choice."""
        prompt, completion = self.num_prompt_tokens, self.num_completion_tokens
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


def start_choices(state: ServerState, request: Request, model: str, prompt: str | list[int],
                  params: SamplingParams, n: int, stream: bool = True) -> ChoiceGroup:
    """Admit n engine requests, all or none (a refusal of one, 429 or 400, ends those already admitted)."""
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n={n} is out of range: accepted 1 to {MAX_N}")
    group = ChoiceGroup(state, request)
    base_id = request.state.request_id
    try:
        for i, choice in enumerate(choice_params(params, n)):
            request_id = base_id if n == 1 else f"{base_id}-{i}"
            group.jobs.append(state.start_job(request, model, prompt, choice, request_id=request_id,
                                              receive=group.client_gone, stream=stream))
    except BaseException:
        group.close()
        raise
    return group
