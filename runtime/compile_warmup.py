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
from typing import TYPE_CHECKING

from runtime.params import SamplingParams

if TYPE_CHECKING:
    from runtime.engine import Engine

logger = logging.getLogger("runtime")


def persistent_compile_cache() -> Path:
    """Set `TORCHINDUCTOR_CACHE_DIR` (if unset) to our cache folder, before anything compiles; returns it."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        root = Path(os.environ.get("LLMENGINE_CACHE_DIR", Path.home() / ".cache" / "llmengine"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "torch_compile")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def warm_up(engine: Engine) -> list[tuple[int, float]]:
    """Run decode steps for one and for two sequences, so that compiling happens now, not in a request; logs and
    returns (batch size, seconds) for each.

    The prompts span more than one cache block: torch.compile specialises sizes 0 and 1, so a warm-up whose
    block tables were one block wide would leave the general graph to compile mid-request. Batch 2 compiles
    the graph every batch size above 1 shares (the runner marks those sizes dynamic).
    """
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, speculate=False)  # plain decode steps
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default")
    timings = []
    for batch in (1, 2):
        label = "1 sequence" if batch == 1 else "2 and more sequences"
        logger.info("torch.compile: compiling the decode step for %s (Inductor cache: %s) ...", label, cache)
        started = time.perf_counter()
        for i in range(batch):
            prompt = [0] * (2 * engine.block_manager.block_size + i)
            engine.add_request(prompt, params, request_id=f"warm-up-{batch}-{i}")
        while engine.has_unfinished():
            engine.step()
        seconds = time.perf_counter() - started
        timings.append((batch, seconds))
        logger.info("torch.compile: the decode step for %s is ready after %.1f s", label, seconds)
    return timings
