"""The engine on a background thread, with an asyncio stream of deltas per request.

The thread owns the model, the scheduler and the cache. Callers hand it work through an inbox (new
sequences, aborts) under a condition variable; the thread takes the inbox at each step boundary, runs a
step and delivers each delta into its request's asyncio.Queue with `loop.call_soon_threadsafe`. With
nothing to do it sleeps on the condition variable. A request added with `stream=False` (a sync HTTP request) gets
one output, all its deltas merged, when it finishes: no event-loop wake-up per token, which on a 2-core machine
competes with the engine's threads (as vLLM's FINAL_ONLY outputs).

Guided decoding needs the tokenizer's llguidance view, which takes ~1.5 s to build: `start()` builds it on a
background thread, so neither the caller's event loop nor the engine's steps ever wait for it. A guided request
that arrives before it is ready is validated at once all the same (ValueError for a bad constraint), and its
stream, when first read, builds the request's matcher in a worker thread (`asyncio.to_thread`, waiting for the
view there) before handing the request to the engine; the other requests keep streaming meanwhile.

    engine = AsyncEngine("smollm2-135m-instruct")
    async for delta in engine.add_request("Hello", SamplingParams(max_new_tokens=8)):
        print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from llmengine_runtime.runtime.engine import Engine, RequestOutput
from llmengine_runtime.runtime.params import SamplingParams
from llmengine_runtime.runtime.sequence import Sequence

logger = logging.getLogger("runtime")


class AsyncEngine:
    def __init__(self, model: str | Path, *, name: str | None = None, **engine_kwargs):
        """`engine_kwargs` are `Engine`'s keyword arguments; `name` is the served name (default: the
        folder's or the zoo name)."""
        self.engine = Engine(model, **engine_kwargs)
        self.name = name or (Path(model).name if Path(model).is_dir() else str(model))
        self.config = self.engine.config
        self.model_dir = self.engine.model_dir
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._final_only: set[str] = set()  # requests added with stream=False
        self._held: dict[str, RequestOutput] = {}  # their deltas so far, merged (engine thread only)
        self._thread: threading.Thread | None = None
        self._guided_thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            if self._stopping:
                raise RuntimeError("the engine has been shut down")
            self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
            self._thread.start()
            if self._guided_thread is None and not self.engine.guided.ready():
                self._guided_thread = threading.Thread(target=self._build_guided_view, daemon=True,
                                                       name=f"guided-view-{self.name}")
                self._guided_thread.start()

    def _build_guided_view(self) -> None:
        try:
            self.engine.guided.view()
        except Exception:  # noqa: BLE001 - the first guided request builds it again and reports the error
            logger.exception("building the tokenizer's llguidance view failed")

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    deadline: float | None = None, stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Validate now (ValueError with the token counts), then stream the request's deltas (stream=False: one
        output with all of them, when it finishes)."""
        loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        deferred = params.guided is not None and not self.engine.guided.ready()
        seq = self.engine.make_sequence(prompt, params, request_id, deadline, defer_guided=deferred)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine has been shut down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = (loop, queue)
            if not stream:
                self._final_only.add(request_id)
            if not deferred:
                self._inbox.append(seq)
                self._cond.notify()
        self.start()
        return self._stream(request_id, queue, seq if deferred else None)

    async def _submit_guided(self, seq: Sequence) -> RequestOutput | None:
        """Build a deferred guided request's matcher in a worker thread (it waits there for the tokenizer view),
        then hand the request to the engine thread; or the request's last output if that failed."""
        try:
            seq.matcher = await asyncio.to_thread(self.engine.guided.matcher, seq.params.guided)
        except Exception as e:  # noqa: BLE001 - only this request fails
            return RequestOutput(seq.request_id, "", [], None, True, "error", seq.num_prompt_tokens, 0,
                                 f"{type(e).__name__}: {e}")
        with self._cond:
            if self._stopping:
                return RequestOutput(seq.request_id, "", [], None, True, "abort", seq.num_prompt_tokens, 0)
            self._inbox.append(seq)
            self._cond.notify()
        return None

    async def _stream(self, request_id: str, queue: asyncio.Queue,
                      deferred: Sequence | None = None) -> AsyncIterator[RequestOutput]:
        finished = False
        submitted = deferred is None
        try:
            if deferred is not None:
                failed = await self._submit_guided(deferred)
                if failed is not None:
                    finished = True
                    with self._cond:
                        self._streams.pop(request_id, None)
                    yield failed
                    return
                submitted = True
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            if not submitted and not finished:  # left while its matcher was built: nothing will end its stream
                with self._cond:
                    self._streams.pop(request_id, None)
            elif not finished:  # the consumer went away (closed, cancelled): free the request's blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            waiting_in_inbox = len(self._inbox)
        stats = self.engine.stats()
        stats["num_waiting"] += waiting_in_inbox
        return stats

    def failure(self) -> str | None:
        """Why the engine can serve no more (a tensor-parallel worker died or hung), or None: /readyz fails then."""
        return self.engine.failure()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Abort what is in flight, stop the engine thread, then the tensor-parallel workers (if any)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.engine.close()

    # -- the engine thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._stopping or self.engine.has_unfinished()):
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            outputs: list[RequestOutput] = []
            try:
                self._iteration(inbox, aborts, stopping, outputs)
            except Exception as e:  # a bug outside the per-step guards: fail everything in flight, go on
                logger.exception("engine loop error")
                for rid in list(self.engine.requests):
                    outputs.append(self.engine.abort(rid, "error", f"{type(e).__name__}: {e}"))
            self._deliver(outputs)
            if stopping:
                return

    def _iteration(self, inbox: list[Sequence], aborts: list[str], stopping: bool,
                   outputs: list[RequestOutput]) -> None:
        """Take in new requests and aborts, then run one step (or, when stopping, abort everything)."""
        engine = self.engine
        for seq in inbox:
            try:
                engine.add(seq)
            except Exception as e:  # noqa: BLE001 - refuse that request only
                outputs.append(RequestOutput(seq.request_id, "", [], None, True, "error",
                                             seq.num_prompt_tokens, 0, f"{type(e).__name__}: {e}"))
        for request_id in aborts:
            if (output := engine.abort(request_id)) is not None:
                outputs.append(output)
        if stopping:
            outputs += [engine.abort(rid) for rid in list(engine.requests)]
            return
        steps = engine.counters["steps"]
        outputs += engine.step()
        if not outputs and engine.counters["steps"] == steps:  # nothing could run: do not spin
            with self._cond:
                self._cond.wait(0.01)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its stream's queue: one wake-up per event loop per step (call_soon_threadsafe writes
        to the loop's self-pipe, a system call each: at 64 streams 64 a step on the engine thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            rid = output.request_id
            with self._cond:
                target = self._streams.get(rid)
                final_only = rid in self._final_only
                if output.finished:
                    self._streams.pop(rid, None)
                    self._final_only.discard(rid)
            if final_only:
                held = self._held.pop(rid, None)
                if held is None and output.token_ids:
                    output = dataclasses.replace(output, first_token_time=time.perf_counter())
                output = output if held is None else merge_outputs(held, output)
                if not output.finished and target is not None:
                    self._held[rid] = output
                    continue
            if target is None:
                continue
            loop, queue = target
            by_loop.setdefault(loop, []).append((queue, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:  # its event loop is closed: nobody listens any more
                for _, output in items:
                    if not output.finished:
                        self.abort(output.request_id)


def put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """On the event loop: each output into its stream's queue, in the engine's order."""
    for queue, output in items:
        queue.put_nowait(output)


def merge_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One delta holding `first` followed by `then` (the later one's status and counts)."""

    def joined(a: list | None, b: list | None) -> list | None:
        return None if a is None and b is None else (a or []) + (b or [])

    def texts(out: RequestOutput) -> list[str]:
        if out.token_texts is not None:
            return out.token_texts
        return [""] * (len(out.token_ids) - 1) + [out.text] if out.token_ids else []

    return dataclasses.replace(
        then, first_token_time=first.first_token_time if first.token_ids else then.first_token_time,
        text=first.text + then.text, token_texts=texts(first) + texts(then), token_ids=first.token_ids + then.token_ids,
        log_probs=joined(first.log_probs, then.log_probs),
        top_log_probs=joined(first.top_log_probs, then.top_log_probs),
        prompt_log_probs=first.prompt_log_probs if first.prompt_log_probs is not None else then.prompt_log_probs,
        prompt_top_log_probs=first.prompt_top_log_probs if first.prompt_top_log_probs is not None
        else then.prompt_top_log_probs,
        prompt_ranks=first.prompt_ranks if first.prompt_ranks is not None else then.prompt_ranks,
        prompt_token_ids=first.prompt_token_ids if first.prompt_token_ids is not None else then.prompt_token_ids)
