"""llama.cpp driven through llama-cpp-python's low-level API, so it runs several sequences in one batch (its
high-level `Llama` runs one): greedy generation of N sequences together, timed per step like our engine's runs
(benchmarks/decode_runners.py `Run`). A prompt is one `llama_decode` of all prompts' tokens (up to n_batch at a
time, logits only at each prompt's last token); each decode step is one `llama_decode` of one token per sequence.

AMX: llama.cpp built with -march=native on a CPU that reports AMX (amx_int8/amx_tile) moves Q4_0, Q4_1, Q8_0 and
k-quant weights to its AMX buffer type, and on this VM its first `ldtilecfg` takes a general protection fault
(every batch of more than one token crashes the process, 2026-12-07). Where the CPU reports AMX we therefore load
models with `use_extra_bufts = False` (no AMX, and none of llama.cpp's other weight repacks either: its speed is
then a lower bound); LLMENGINE_LLAMACPP_EXTRA_BUFTS=1 turns them back on.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from llmengine_runtime.benchmarks.decode_runners import Run


class LlamaCppBatch:
    """A llama.cpp model and context for up to `n_seq` sequences of `n_ctx // n_seq` tokens each."""

    def __init__(self, gguf: Path, threads: int, n_seq: int = 8, n_ctx: int = 8192, n_batch: int = 512):
        try:
            import llama_cpp
        except ImportError:
            raise SystemExit("the llama.cpp baseline needs llama-cpp-python: pip install '.[llamacpp]' "
                             "(compiles llama.cpp, a few minutes; `make bench` does it)") from None
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(_QUIET, None)  # its load and context logs run to hundreds of lines per file
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), model_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, index: int) -> int:
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> Run:
        """Greedy, `max_new_tokens` per sequence past any end token, all sequences in each step."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        entries = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        tokens: list[list[int]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start:start + self.n_batch]
            self._decode(chunk)
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    tokens[seq].append(self._argmax(i))
        first = time.perf_counter()
        steps = []
        for _ in range(max_new_tokens - 1):
            self._decode([(out[-1], len(p) + len(out) - 1, s, True) for s, (p, out) in enumerate(zip(prompts, tokens))])
            for s in range(len(prompts)):
                tokens[s].append(self._argmax(s))
            steps.append(time.perf_counter())
        end = steps[-1] if steps else first
        return Run(ttft=first - t0, decode_time=end - first, decode_steps=len(steps),
                   decode_tokens=len(steps) * len(prompts), total_time=end - t0,
                   output_tokens=sum(map(len, tokens)), token_ids=tokens)


def extra_buffer_types() -> bool:
    """Whether llama.cpp may use its extra weight buffer types here (module docstring: not where AMX is reported)."""
    if os.environ.get("LLMENGINE_LLAMACPP_EXTRA_BUFTS"):
        return os.environ["LLMENGINE_LLAMACPP_EXTRA_BUFTS"] == "1"
    try:
        return " amx_int8" not in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True


def model_params():
    """llama_model_default_params with extra buffer types off where `extra_buffer_types()` says so."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = extra_buffer_types()
    return params


@contextlib.contextmanager
def high_level_model_params():
    """While it lasts, llama_cpp.Llama(...) loads as `model_params()` says (it takes no such argument)."""
    import llama_cpp.llama_cpp as lib

    saved = lib.llama_model_default_params

    def patched():
        params = saved()
        params.use_extra_bufts = extra_buffer_types()
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = saved


def _quiet_log(level: int, text: bytes, user_data) -> None:
    pass


try:
    import llama_cpp as _llama_cpp

    _QUIET = _llama_cpp.llama_log_callback(_quiet_log)  # kept referenced: llama.cpp calls it later
except ImportError:  # the module still imports; LlamaCppBatch says how to install
    _QUIET = None
