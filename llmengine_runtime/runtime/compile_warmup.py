"""`--compile`: compile the decode step before serving, say what is compiling and for how long, and keep what
Inductor built across runs.

torch.compile traces the model with Dynamo on every start, but Inductor's generated code is cached (its FX graph
and AOTAutograd caches, on by default) under `TORCHINDUCTOR_CACHE_DIR`. Torch's default is a folder in /tmp,
which a reboot or a container restart empties; `persistent_compile_cache` points it at
`$LLMENGINE_CACHE_DIR/torch_compile` (default `~/.cache/llmengine/torch_compile`) unless the operator set it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from llmengine_runtime.runtime.params import SamplingParams

logger = logging.getLogger("runtime")


class WarmUpTarget(Protocol):
    """What the warm-up drives: runtime/engine.py's Engine."""

    thread_tuner: Any
    block_manager: Any

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Any: ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list: ...


def persistent_compile_cache() -> Path:
    """Set `TORCHINDUCTOR_CACHE_DIR` (if unset) to our cache folder, before anything compiles; returns it."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        root = Path(os.environ.get("LLMENGINE_CACHE_DIR", Path.home() / ".cache" / "llmengine"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "torch_compile")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def warm_up(engine: WarmUpTarget) -> list[tuple[int, int, float]]:
    """Run decode steps for one and for two sequences, so that compiling happens now, not in a request; logs and
    returns (threads, batch size, seconds) for each.

    The prompts span more than one cache block (and the runner pads every block table to 2 columns or more):
    torch.compile specialises sizes 0 and 1, so a one-block table would compile a graph of its own. Batch 2
    compiles the graph every batch size above 1 shares (the runner marks those sizes dynamic). Dynamo also guards
    on torch's thread count, so with the thread tuner (runtime/thread_tuner.py) each count it may pick is warmed
    up too: the tuner's first trial would otherwise compile in the middle of a request.
    """
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, speculate=False)  # plain decode steps
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default")
    tuner = engine.thread_tuner
    counts = tuner.candidates if tuner is not None else [torch.get_num_threads()]
    engine.thread_tuner = None  # the warm-up sets the counts itself
    timings = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            for batch in (1, 2):
                label = f"{'1 sequence' if batch == 1 else '2 and more sequences'}, {threads} thread(s)"
                logger.info("torch.compile: compiling the decode step for %s (Inductor cache: %s) ...", label, cache)
                started = time.perf_counter()
                for i in range(batch):
                    prompt = [0] * (2 * engine.block_manager.block_size + i)
                    engine.add_request(prompt, params, request_id=f"warm-up-{threads}-{batch}-{i}")
                while engine.has_unfinished():
                    engine.step()
                seconds = time.perf_counter() - started
                timings.append((threads, batch, seconds))
                logger.info("torch.compile: the decode step for %s is ready after %.1f s", label, seconds)
    finally:
        engine.thread_tuner = tuner
        torch.set_num_threads(tuner.threads if tuner is not None else counts[0])
    return timings
