"""One forward step of a mixed batch over the paged KV cache, which the runner owns.

`run(chunks)` (chunks: runtime/step.py) returns fp32 logits for the last `num_logits` positions of each chunk. The
step's inputs go into buffers kept from step to step (`StepBuffers`), and the executor chosen when the runner is
built runs it (runtime/executor.py: our C++ step, or eager torch, compiled or not).

`execute(batch)` is the engine's step: for each scheduled (sequence, n) it feeds the sequence's next n
tokens, its uncomputed tokens followed by its proposals (`seq.draft_token_ids`) when it speculates. It
returns the sequences that sample (those whose chunk reaches their last token) and their logits: one row for
the last token (plain decode, last prefill chunk), plus one per proposal (row j scores the token after
proposal j - 1), so 1 + k rows for a speculating sequence. A sequence mid-prefill gives none, and so does a
request that only scores its prompt (max_new_tokens 0).

A request with `prompt_log_probs` also has each of its prompt positions scored as its chunks go through: the
log-prob of the next prompt token (its rank and its top-N) is appended to `seq.prompt_log_probs` (runtime/log_probs.py:
only those numbers are kept, never the full rows), so chunked prefill accumulates them over several steps and a
preempted sequence does not score a position twice.
"""

from __future__ import annotations

import torch

from llmengine_runtime.models.attention import AttentionMetadata, KVCache, allocate_kv_caches
from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.runtime.executor import StepResult, StepSender, make_executor
from llmengine_runtime.runtime.sequence import Sequence
from llmengine_runtime.runtime.step import Chunk, StepBuffers, chunk_of

__all__ = ["Chunk", "ModelRunner", "chunk_of"]


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, compile_decode: bool = False,
                 workers: StepSender | None = None, kv_cache_dtype: torch.dtype | None = None):
        """`workers`: rank 0 of a tensor-parallel group sends each step's inputs to them before its own forward
        (runtime/tp_worker.py); `model` is then rank 0's shard, and so is the KV cache."""
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.kv_cache_dtype = kv_cache_dtype or self.dtype  # (fp16 for the model's fp32: runtime/engine_setup.py)
        self.kv_caches: list[KVCache] = allocate_kv_caches(model.shard_config, num_blocks, block_size,
                                                           self.kv_cache_dtype, self.device)
        self.executor = make_executor(model, self.kv_caches, compile_decode, workers)
        self.buffers = StepBuffers(device=self.device)

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Feed the chunks; fp32 logits `[sum(num_logits), vocab]`, chunk after chunk: valid until the next run (the C++
        step writes them into its bound buffer, no copy a step), so clone what must outlive it."""
        return self.executor.run(chunks, self.buffers, self.block_size).logits

    def run_scored(self, chunks: list[Chunk]) -> StepResult:
        """As run, plus per chunk its prompt scores, and each logits row's argmax when the step took it."""
        return self.executor.run(chunks, self.buffers, self.block_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's forward over the cache, as the executor runs it: hidden states `[num_tokens, hidden]` (a
        tensor-parallel worker's step)."""
        return self.executor.forward(input_ids, positions, meta)

    def execute(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor, list[int],
                                                                  list[int] | None]:
        """Run the engine's step: the sequences that sample, in batch order, their fp32 logits
        `[sum(num_rows), vocab]` packed in that order, `num_rows` (1 + proposals) for each, and the logits rows'
        argmax when the step took it on the way (else None)."""
        chunks = [chunk_of(seq, n) for seq, n in batch]
        sampling = [seq for (seq, _), chunk in zip(batch, chunks) if chunk.num_logits]
        num_rows = [chunk.num_logits for chunk in chunks if chunk.num_logits]
        result = self.run_scored(chunks)
        for (seq, _), (log_probs, ranks, tops) in zip(batch, result.scores):
            seq.prompt_log_probs += log_probs
            seq.prompt_ranks += ranks
            seq.prompt_top_log_probs += tops
        return sampling, result.logits, num_rows, result.argmax
