"""The synchronous engine: requests in, one step at a time, token deltas out.

`Engine.step()` expires requests past their deadline, asks the scheduler for a batch, runs it, samples,
and turns each step's new tokens into a `RequestOutput` delta (stop tokens, stop strings, max_new_tokens). The
async engine runs it on a background thread; `LLM` runs it in a plain loop.

With `speculative` ("ngram" or a draft model), sequences in decode propose up to k tokens and the target
checks them in the same forward pass (runtime/speculative/step.py): a step may then emit several tokens per request,
appended one by one, the first that ends the request dropping the rest. The rejected proposals' K/V lies past
the new length: the blocks entirely past it go back to the pool at once, and the slots in the last kept block
are overwritten by the next tokens; blocks are registered in the prefix cache only after that rollback.

A model folder without tokenizer files (the tiny test checkpoints) still serves token-id prompts: the
deltas then carry token ids and empty text, and string prompts or stop strings are rejected.
"""

from __future__ import annotations

import logging
import time
import uuid
import weakref
from collections import Counter
from pathlib import Path

import torch

from llmengine_runtime.kernels.deterministic import set_deterministic
from llmengine_runtime.models.config import load_config
from llmengine_runtime.models.loader import load_model, resolve_device
from llmengine_runtime.models.tokenizer import TOKENIZER_FILES, Tokenizer, stop_token_ids
from llmengine_runtime.runtime.block_manager import BlockManager
from llmengine_runtime.runtime.compile_warmup import persistent_compile_cache, warm_up
from llmengine_runtime.runtime.detokenizer import TextStream
from llmengine_runtime.runtime.engine_guided import EngineGuided
from llmengine_runtime.runtime.engine_setup import (
    checked_prompt_ids,
    compute_dtype,
    kv_cache_plan,
    resolve_model_dir,
)
from llmengine_runtime.runtime.guided import apply_token_masks
from llmengine_runtime.runtime.log_probs import TopLogProbs, prompt_scores
from llmengine_runtime.runtime.logits_processors import logits_processing
from llmengine_runtime.runtime.model_runner import ModelRunner
from llmengine_runtime.runtime.params import SamplingParams
from llmengine_runtime.runtime.request_output import FINISH_REASONS, RequestOutput
from llmengine_runtime.runtime.sampler import Sampler
from llmengine_runtime.runtime.scheduler import Scheduler
from llmengine_runtime.runtime.sequence import Sequence
from llmengine_runtime.runtime.speculative.step import make_speculator
from llmengine_runtime.runtime.stopping import after_token
from llmengine_runtime.runtime.thread_tuner import make_thread_tuner
from llmengine_runtime.runtime.tp_step import TensorParallelError
from llmengine_runtime.runtime.tp_worker import TPWorkers, rank_zero

logger = logging.getLogger("runtime")
COUNTERS = ("requests_added", "steps", "failed_steps", "tokens_computed", "tokens_generated",
            *(f"finished_{reason}" for reason in FINISH_REASONS),
            "spec_proposed_tokens", "spec_accepted_tokens", "spec_steps")  # spec_steps: sequence-steps that proposed


class Engine:
    def __init__(self, model: str | Path, *, dtype: str = "auto", device: str = "auto",
                 kv_cache_gib: float | None = None, gpu_memory_utilization: float = 0.9, block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 progress: bool = False, compile: bool = False, enable_prefix_caching: bool = True,
                 speculative: str | Path | None = None, num_speculative_tokens: int = 4, prompt_lookup_min: int = 1,
                 prompt_lookup_max: int = 4, quantize: str | None = None, quant_group_size: int | None = None,
                 tensor_parallel_size: int = 1, tp_timeout_s: float = 60.0, cpu_threads: int | str | None = None,
                 kv_cache_dtype: str = "auto", deterministic: bool = False):
        """`speculative`: None, "ngram" (prompt lookup, `prompt_lookup_min..max`-token patterns) or a draft
        model's zoo name or folder; up to `num_speculative_tokens` proposals per sequence and step.
        `quantize`: weight-only quantization, models.loader.load_model's (None/"none", "int8", "int4" in groups
        of `quant_group_size`, "gguf", "auto": a GGUF's own integers on CPU); "auto" with an explicit dtype
        means float weights of that dtype. Activations keep `dtype`; the KV cache holds `kv_cache_dtype`
        ("auto": fp16 for quantized weights on CPU, else `dtype`; runtime/engine_setup.resolve_kv_cache_dtype).
        `tensor_parallel_size` N > 1: the layers are split over N ranks, this process (rank 0: scheduler, sampler,
        detokenizer, logits) and N - 1 worker processes (runtime/tp_worker.py; one GPU each on CUDA), whose every
        collective waits at most `tp_timeout_s`. A worker that dies or hangs stops the engine (`failure()`).
        Call `close()` to stop the workers (they also stop when this process exits).
        `cpu_threads` (CPU): None leaves torch's thread count, N sets it, "auto" times decode steps with 1 thread
        and with torch's count and keeps the faster (runtime/thread_tuner.py: a busy neighbour process).
        `deterministic` (`--deterministic`): the batch-invariant Triton paths on CUDA, slower (kernels/deterministic.py;
        process-wide, and on before any tensor-parallel worker starts, which inherits it). On the CPU it changes
        nothing: our C++ kernels are batch-invariant always; float-weight products (torch's F.linear) are not."""
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if value < 1:
                raise ValueError(f"{name}={value} is out of range: accepted an integer >= 1")
        model_dir = resolve_model_dir(model)
        self.model_dir = model_dir
        self.config = config = load_config(model_dir)
        if compile:
            persistent_compile_cache()  # before anything (this process or a worker) compiles
        self.device = resolve_device(device)
        if deterministic:
            set_deterministic(True)
        self.thread_tuner = make_thread_tuner(cpu_threads, self.device, tensor_parallel_size)
        if quantize == "auto" and dtype != "auto":
            quantize = None
        self.dtype = compute_dtype(dtype, self.device, config)
        self.workers: TPWorkers | None = None
        self.stopped: str | None = None  # why the engine can run no more steps (a tensor-parallel worker failed)
        tp = rank_zero(tensor_parallel_size, config, model_dir, speculative, quantize, quant_group_size)
        if tp is not None:
            if self.device.type == "cuda":
                self.device = torch.device("cuda:0")
            self.workers = TPWorkers.start(model_dir, world_size=tensor_parallel_size, dtype=self.dtype,
                                           device=self.device, quantize=quantize, group_size=quant_group_size,
                                           block_size=block_size, compile=compile, timeout_s=tp_timeout_s)
            weakref.finalize(self, self.workers.close)  # an engine dropped without close() stops them too
        try:  # the workers load their shards meanwhile, then wait for the block count
            self.model = load_model(model_dir, self.dtype, self.device, progress=progress, config=config,
                                    quantize=quantize, group_size=quant_group_size, tp=tp)
            self.kv_cache_dtype, num_blocks = kv_cache_plan(
                self.model, config, self.dtype, self.device, kv_cache_dtype, block_size, kv_cache_gib,
                gpu_memory_utilization, max_num_batched_tokens, max_num_seqs, tensor_parallel=tp is not None)
            if self.workers is not None:
                self.workers.send(num_blocks)
        except BaseException:
            self.close()
            raise
        has_tokenizer = any((model_dir / name).is_file() for name in TOKENIZER_FILES)
        self.tokenizer = Tokenizer.from_folder(model_dir) if has_tokenizer else None
        self.stop_token_ids = stop_token_ids(config, self.tokenizer)
        self.guided = EngineGuided(self.tokenizer, model_dir, config.vocab_size, self.stop_token_ids)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching,
                                          cache_salt=f"{model_dir.resolve()}:{self.dtype}")
        self.runner = ModelRunner(self.model, num_blocks, block_size, compile_decode=compile, workers=self.workers,
                                  kv_cache_dtype=self.kv_cache_dtype)
        self.sampler = Sampler()
        self.cache_tokens = num_blocks * block_size
        self.max_model_len = min(max_model_len or config.max_position_embeddings, self.cache_tokens)
        if self.model.rope is not None:
            self.model.rope.reserve(self.max_model_len)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.speculator = make_speculator(speculative, num_speculative_tokens, prompt_lookup_min, prompt_lookup_max,
                                          self)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens,
                                   self.speculator.lookahead if self.speculator else None)
        self.requests: dict[str, Sequence] = {}
        # Every key exists from the start, so stats() has a fixed shape and no key appears mid-read.
        self.counters: Counter[str] = Counter({key: 0 for key in COUNTERS})
        if compile:
            self.warm_up()
            self.counters = Counter({key: 0 for key in COUNTERS})
            self.block_manager.reset_stats()

    # -- requests -------------------------------------------------------------------------------------
    def make_sequence(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                      deadline: float | None = None, defer_guided: bool = False) -> Sequence:
        """Validate a request and build its sequence (touches no engine state: safe from any thread). With
        `defer_guided`, a guided constraint is only validated (milliseconds, no tokenizer view needed) and
        `seq.matcher` is left for the caller to set with `guided.matcher`, off a thread that must not wait.
        RuntimeError once the engine has stopped (`failure()`)."""
        if (failure := self.failure()) is not None:
            raise RuntimeError(f"the engine has stopped: {failure}")
        params.validate()
        prompt_ids = checked_prompt_ids(prompt, params, self.tokenizer, self.model_dir, self.config.vocab_size,
                                        self.max_model_len, self.cache_tokens)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        text = TextStream(self.tokenizer, prompt_ids, params.stop_sequences, params.include_stop_str_in_output,
                          params.skip_special_tokens)
        seq = Sequence(request_id or uuid.uuid4().hex, prompt_ids, params, text, deadline, generator)
        seq.processing = logits_processing(params, self.tokenizer, self.config.vocab_size, self.stop_token_ids)
        if defer_guided and params.guided is not None:
            self.guided.validate(params.guided)
        else:
            seq.matcher = self.guided.matcher(params.guided)
        return seq

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in flight")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        self.counters["requests_added"] += 1

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    deadline: float | None = None) -> Sequence:
        seq = self.make_sequence(prompt, params, request_id, deadline)
        self.add(seq)
        return seq

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> RequestOutput | None:
        """Finish a request now (its blocks go back at once); None if it is not in flight."""
        seq = self.requests.get(request_id)
        return None if seq is None else self._finish(seq, reason, error)

    def warm_up(self) -> list[tuple[int, int, float]]:
        """Compile the decode step now, not in a request (runtime/compile_warmup.py): (threads, batch, seconds)."""
        return warm_up(self)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = [self._finish(seq, "timeout") for seq in list(self.requests.values())
                   if seq.deadline is not None and now >= seq.deadline]
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        self.counters["steps"] += 1
        try:
            draft_probs = None
            if self.speculator is not None:
                batch, draft_probs = self.speculator.propose(batch)
            tuning = self.thread_tuner is not None and all(n == 1 for _, n in batch)
            if tuning:
                self.thread_tuner.before_decode_step()
                started = time.perf_counter()
            try:
                sampling, logits, num_rows, argmax = self.runner.execute(batch)
            except TensorParallelError as e:  # the ranks are out of step: no step can run any more
                return outputs + self._stop(str(e))
            if any(seq.matcher is not None for seq in sampling):  # on the raw logits, before penalties & co
                # Speculating rows are masked as after the earlier proposals; the verifier then never accepts a
                # proposal the constraint forbids (its probability is 0), so every emitted token is allowed.
                drafts = [seq.draft_token_ids for seq in sampling] if any(n > 1 for n in num_rows) else None
                apply_token_masks(logits, [seq.matcher for seq in sampling], drafts)
                argmax = None  # (of the logits before the masks)
            need_log_probs = any(seq.params.return_token_log_probs for seq in sampling)
            if self.speculator is not None:
                tokens, log_probs, tops = self.speculator.verify(sampling, logits, num_rows, draft_probs,
                                                                 need_log_probs, argmax)
            else:
                flat_tokens, flat_log_probs, flat_tops = self.sampler.sample(logits, sampling, need_log_probs,
                                                                             argmax) if sampling else ([], [], [])
                tokens, log_probs, tops = [[t] for t in flat_tokens], [[lp] for lp in flat_log_probs], \
                    [[top] for top in flat_tops]
            if tuning:
                self.thread_tuner.after_decode_step(time.perf_counter() - started, len(batch))
        except Exception as e:  # the whole step failed: fail its requests, keep serving the others
            logger.exception("engine step failed; failing its %d requests", len(batch))
            self.counters["failed_steps"] += 1
            for seq, _ in batch:
                seq.draft_token_ids = []
            return outputs + [self._finish(seq, "error", f"{type(e).__name__}: {e}") for seq, _ in batch]
        emitted = {seq: (t, lp, top) for seq, t, lp, top in zip(sampling, tokens, log_probs, tops)}
        for seq, n in batch:
            seq.num_computed_tokens += n
            self.counters["tokens_computed"] += n
            if seq not in emitted:  # mid-prefill, or a prompt scored without generating (max_new_tokens 0)
                self.block_manager.cache_full_blocks(seq)
                if seq.params.max_new_tokens == 0 and seq.num_computed_tokens >= seq.num_tokens:
                    outputs.append(self._finish(seq, "length"))
                continue
            seq_tokens, seq_log_probs, seq_tops = emitted[seq]
            if seq.draft_token_ids:  # the last token and the accepted proposals have valid K/V; not the rest
                num_accepted = len(seq_tokens) - 1
                seq.num_computed_tokens -= len(seq.draft_token_ids) - num_accepted
                self.counters["spec_proposed_tokens"] += len(seq.draft_token_ids)
                self.counters["spec_accepted_tokens"] += num_accepted
                self.counters["spec_steps"] += 1
                self.speculator.record(seq, len(seq.draft_token_ids), num_accepted)
                seq.draft_token_ids = []
            try:
                outputs.append(self._append_tokens(seq, seq_tokens, seq_log_probs, seq_tops))
            except Exception as e:  # one request's bookkeeping failed: only that request fails
                logger.exception("request %s failed", seq.request_id)
                outputs.append(self._finish(seq, "error", f"{type(e).__name__}: {e}"))
        return outputs

    def _append_tokens(self, seq: Sequence, tokens: list[int], log_probs: list[float],
                       tops: list[TopLogProbs]) -> RequestOutput:
        """Append a step's emitted tokens one by one: the first that ends the request (stop token, stop
        string, max_new_tokens: runtime/stopping.py) drops the rest. Then give back the blocks past the K/V still
        valid, register the full ones in the prefix cache, and free them all if the request ended."""
        p = seq.params
        text, reason, stop_reason, kept = "", None, None, 0
        for token in tokens:
            seq.output_token_ids.append(token)
            self.counters["tokens_generated"] += 1
            kept += 1
            if seq.matcher is not None:
                seq.matcher.advance(token)
            end = after_token(seq, token, self.stop_token_ids)  # runtime/stopping.py
            text, reason, stop_reason = text + end.text, end.reason, end.stop_reason
            if reason is not None:
                break
        # Accepted proposals after a stop were computed but are not tokens of the sequence.
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
        self.block_manager.truncate(seq, seq.num_computed_tokens)
        self.block_manager.cache_full_blocks(seq)
        if reason is not None:
            self._release(seq, reason)
        return RequestOutput(seq.request_id, text, tokens[:kept],
                             log_probs[:kept] if p.return_token_log_probs else None, reason is not None, reason,
                             seq.num_prompt_tokens, len(seq.output_token_ids),
                             top_log_probs=tops[:kept] if p.top_log_probs else None, **prompt_scores(seq),
                             stop_reason=stop_reason, num_cached_tokens=seq.num_cached_tokens or 0)

    def _release(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.requests.pop(seq.request_id, None)
        self.counters[f"finished_{reason}"] += 1

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        """End a request that did not end by a token (abort, timeout, error): flush held text, free blocks."""
        self._release(seq, reason)
        try:
            text = seq.text.flush()
        except Exception:  # noqa: BLE001 - a broken detokenizer must not stop the finishing
            text = ""
        return RequestOutput(seq.request_id, text, [], [] if seq.params.return_token_log_probs else None, True,
                             reason, seq.num_prompt_tokens, len(seq.output_token_ids), error,
                             [] if seq.params.top_log_probs else None, **prompt_scores(seq),
                             num_cached_tokens=seq.num_cached_tokens or 0)

    def _stop(self, reason: str) -> list[RequestOutput]:
        """Stop for good after a tensor-parallel failure: fail every request, stop the workers."""
        logger.error("engine stopped: %s; failing its %d requests", reason, len(self.requests))
        self.stopped = reason
        self.counters["failed_steps"] += 1
        outputs = []
        for seq in list(self.requests.values()):
            seq.draft_token_ids = []
            outputs.append(self._finish(seq, "error", f"the engine stopped: {reason}"))
        self.close()
        return outputs

    def failure(self) -> str | None:
        """Why the engine can serve no more (a tensor-parallel worker died or hung), or None."""
        if self.stopped is None and self.workers is not None:
            return self.workers.failure()
        return self.stopped

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent); the engine serves no more after it."""
        if self.workers is not None:
            self.workers.close()
            if self.stopped is None:
                self.stopped = "the engine was closed"

    def stats(self) -> dict:
        bm = self.block_manager
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "blocks_total": bm.num_blocks, "blocks_used": bm.num_used, "blocks_free": bm.num_free,
                "block_size": bm.block_size, "num_preemptions": self.scheduler.num_preemptions,
                **bm.stats(), **self.counters}
