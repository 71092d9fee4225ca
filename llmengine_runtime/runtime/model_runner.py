"""One forward step of a mixed batch over the paged KV cache, which the runner owns.

A step feeds chunks: each is some consecutive tokens of one sequence, their positions, the sequence's block
table (each token's K/V goes to its slot) and its length after the step (the AttentionMetadata contract of
models/attention.py), packed one sequence after another. `run(chunks)` returns fp32 logits for the last
`num_logits` positions of each chunk.

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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmengine_runtime.models.attention import AttentionMetadata, KVCache, allocate_kv_caches
from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.runtime.decode_buffers import DecodeBuffers
from llmengine_runtime.runtime.log_probs import Scores, score_positions
from llmengine_runtime.runtime.sequence import Sequence
from llmengine_runtime.runtime.tp_step import TensorParallelError

if TYPE_CHECKING:
    from llmengine_runtime.models.fused_decode import FusedDecode
    from llmengine_runtime.runtime.tp_worker import TPWorkers


NUMPY_INTS = {torch.int32: np.int32, torch.int64: np.int64}


@dataclass
class Chunk:
    """`token_ids` of one sequence at positions `start`.., stored through `block_table`; the logits of its last
    `num_logits` positions are wanted."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    num_logits: int
    score_from: int = 0  # prompt scoring: positions start + score_from + j score score_targets[j] (the next token)
    score_targets: list[int] = field(default_factory=list)
    score_top: int = 0  # and keep the top-N of each of those distributions


def chunk_of(seq: Sequence, n: int) -> Chunk:
    """The chunk of a scheduled (seq, n): its next n tokens, proposals after its own; logits from its last
    token on."""
    start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
    num_drafts = end - seq.num_tokens
    if num_drafts > len(seq.draft_token_ids):
        raise ValueError(f"{seq.request_id}: {n} tokens scheduled, but it has {seq.num_uncomputed_tokens} "
                         f"uncomputed and {len(seq.draft_token_ids)} proposed")
    token_ids = seq.token_ids(start, min(end, seq.num_tokens)) + seq.draft_token_ids[:max(0, num_drafts)]
    num_logits = max(0, num_drafts + 1)
    if len(seq.output_token_ids) >= seq.params.max_new_tokens:  # max_new_tokens 0: score the prompt, sample nothing
        num_logits = 0
    chunk = Chunk(token_ids, start, seq.block_table, num_logits)
    if seq.params.prompt_log_probs:
        first = max(start, len(seq.prompt_log_probs))  # the positions not scored yet
        last = min(end, seq.num_prompt_tokens - 1)  # the last prompt position predicts an output token
        if last > first:
            chunk.score_from = first - start
            chunk.score_targets = seq.prompt_token_ids[first + 1:last + 1]
            chunk.score_top = seq.params.prompt_top_n
    return chunk


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, compile_decode: bool = False,
                 workers: TPWorkers | None = None, kv_cache_dtype: torch.dtype | None = None):
        """`workers`: rank 0 of a tensor-parallel group sends each step's inputs to them before its own forward
        (runtime/tp_worker.py); `model` is then rank 0's shard, and so is the KV cache."""
        self.model = model
        self.workers = workers
        # Decode steps have one shape family (one token per sequence): torch.compile fuses their many small
        # ops (norms, rotary, cache writes, masks) into a few kernels, which on CPU is most of the time
        # outside the matrix products. Prefill chunks (and speculating sequences) stay eager.
        self.decode_forward = torch.compile(model.forward, dynamic=True) if compile_decode else model.forward
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.kv_cache_dtype = kv_cache_dtype or self.dtype  # (fp16 for the model's fp32: runtime/engine_setup.py)
        self.kv_caches: list[KVCache] = allocate_kv_caches(model.shard_config, num_blocks, block_size,
                                                           self.kv_cache_dtype, self.device)
        # The one-call CPU decode step with its head (models/fused_decode.py) and its buffers, made at its first step
        self.fused_head_step: FusedDecode | None | bool = False  # False: not resolved yet
        self.decode_buffers: DecodeBuffers | None = None

    def prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """input_ids, positions, metadata, and the indices (into the packed tokens) whose logits are wanted."""
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu_seqlens = [0]
        logit_index: list[int] = []
        for chunk in chunks:
            n = len(chunk.token_ids)
            start, end = chunk.start, chunk.start + n
            input_ids += chunk.token_ids
            positions += range(start, end)
            table = chunk.block_table
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            seq_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + n)
            logit_index += range(cu_seqlens[-1] - chunk.num_logits, cu_seqlens[-1])
        # At least 2 columns: torch.compile specialises a dimension of size 1, so a short request's 1-block table
        # would compile a graph of its own mid-request (the warm-up's are wider); the padding is never read.
        width = max(2, max(len(chunk.block_table) for chunk in chunks))
        tables = [chunk.block_table + [0] * (width - len(chunk.block_table)) for chunk in chunks]

        on_cpu = self.device.type == "cpu"

        def tensor(values, dtype):
            # numpy builds a small tensor of Python ints in a third of torch.tensor's time, and a no-op .to() costs
            # ~10 us: a decode step runs cold after its weight stream, so each of these costs 2-3x that.
            t = torch.from_numpy(np.array(values, dtype=NUMPY_INTS[dtype]))
            return t if on_cpu else t.to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            cu_seqlens_q=tensor(cu_seqlens, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            max_seqlen_q=max(len(chunk.token_ids) for chunk in chunks),
            is_decode=all(len(chunk.token_ids) == 1 for chunk in chunks),
        )
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta, logit_index

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Feed the chunks; fp32 logits `[sum(num_logits), vocab]`, chunk after chunk."""
        return self.run_scored(chunks)[0]

    def run_scored(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[Scores], list[int] | None]:
        """As run, plus per chunk the log-probs, ranks and top-N of its `score_targets` ([] for none), and each logits
        row's argmax when the step took it on the way (the one-call decode step with its head), else None. The
        logits of such a step are a view of the runner's buffers, which its next step overwrites."""
        if self.workers is None and all(len(chunk.token_ids) == chunk.num_logits == 1 for chunk in chunks):
            # A decode step that wants every row's logits (so no prompt scoring): the one-call step with its head,
            # on buffers bound once (runtime/decode_buffers.py), when the model has it. (Outside inference mode,
            # which costs ~80 us cold: no tensor is made on the way.)
            fused = self.fused_head_step
            if fused is False:  # resolved at the first decode step, once: it depends on the model and our caches only
                fused = self.model.fused_decoder(self.kv_caches)
                fused = self.fused_head_step = fused if fused is not None and fused.has_head else None
            if fused is not None:
                buffers = self.decode_buffers
                if buffers is None:
                    buffers = self.decode_buffers = DecodeBuffers(fused.head_rows)
                buffers.fill(chunks, self.block_size)
                fused.step_buffers(buffers, self.kv_caches, argmax=True)
                return buffers.step_logits(), [([], [], [])] * len(chunks), buffers.step_argmax()
        return self._run_scored_eager(chunks)

    @torch.inference_mode()
    def _run_scored_eager(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[Scores], None]:
        """run_scored through the model's forward (and its head): every step but the fused ones."""
        input_ids, positions, meta, logit_index = self.prepare(chunks)
        if self.workers is None:
            hidden = self.forward(input_ids, positions, meta)
        else:  # every rank runs this forward; a failure leaves the ranks out of step, so it ends the group
            try:
                self.workers.send_step(input_ids, positions, meta)
                hidden = self.forward(input_ids, positions, meta)
            except TensorParallelError:
                raise
            except Exception as e:
                raise self.workers.error(e) from e
        scores = self.score(chunks, hidden)
        if not logit_index:
            return torch.empty(0, self.model.config.vocab_size, dtype=torch.float32, device=self.device), scores, None
        if len(logit_index) < hidden.shape[0]:  # (increasing indices: as many as rows means every row, in order)
            hidden = hidden[torch.tensor(logit_index, dtype=torch.int64).to(self.device)]
        return self.model.compute_logits(hidden).float(), scores, None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's forward over the cache: hidden states `[num_tokens, hidden]` (decode steps compiled)."""
        forward = self.model.forward
        if meta.is_decode:
            # The one-call CPU decode step (models/fused_decode.py) is already what compiling would aim at: called
            # here directly, not compiled (and its applicability checked once a step).
            fused = self.model.fused_decode_for(meta, self.kv_caches)
            if fused is not None:
                return fused(input_ids, positions, meta, self.kv_caches)
            forward = self.decode_forward
            # One compiled graph for every block-table width, and one for every batch size above 1.
            torch._dynamo.maybe_mark_dynamic(meta.block_tables, 1)
            if meta.seq_lens.numel() > 1:
                for t in (input_ids, positions, meta.seq_lens, meta.slot_mapping, meta.cu_seqlens_q):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(meta.block_tables, 0)
        return forward(input_ids, positions, meta, self.kv_caches)

    def score(self, chunks: list[Chunk], hidden: torch.Tensor) -> list[Scores]:
        """The chunks' prompt scores from the packed hidden states, all chunks' positions in one pass."""
        if not any(chunk.score_targets for chunk in chunks):
            return [([], [], []) for _ in chunks]
        rows: list[int] = []
        targets: list[int] = []
        ns: list[int] = []
        offset = 0
        for chunk in chunks:
            first = offset + chunk.score_from
            rows += range(first, first + len(chunk.score_targets))
            targets += chunk.score_targets
            ns += [chunk.score_top] * len(chunk.score_targets)
            offset += len(chunk.token_ids)
        if not rows:
            return [([], [], []) for _ in chunks]
        log_probs, ranks, tops = score_positions(self.model, hidden[torch.tensor(rows).to(self.device)], targets, ns)
        scores: list[Scores] = []
        at = 0
        for chunk in chunks:
            m = len(chunk.score_targets)
            scores.append((log_probs[at:at + m], ranks[at:at + m], tops[at:at + m]))
            at += m
        return scores

    def execute(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor, list[int],
                                                                  list[int] | None]:
        """Run the engine's step: the sequences that sample, in batch order, their fp32 logits
        `[sum(num_rows), vocab]` packed in that order, `num_rows` (1 + proposals) for each, and the logits rows'
        argmax when the step took it on the way (else None)."""
        chunks = [chunk_of(seq, n) for seq, n in batch]
        sampling = [seq for (seq, _), chunk in zip(batch, chunks) if chunk.num_logits]
        num_rows = [chunk.num_logits for chunk in chunks if chunk.num_logits]
        logits, scores, argmax = self.run_scored(chunks)
        for (seq, _), (log_probs, ranks, tops) in zip(batch, scores):
            seq.prompt_log_probs += log_probs
            seq.prompt_ranks += ranks
            seq.prompt_top_log_probs += tops
        return sampling, logits, num_rows, argmax
