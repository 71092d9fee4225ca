"""A step's inputs, built once, in one place, into tensors kept from step to step.

A step feeds chunks: each is some consecutive tokens of one sequence, their positions, the sequence's block table
(each token's K/V goes to its slot) and its length after the step (the AttentionMetadata contract of
models/attention.py), packed one sequence after another. `StepBuffers.fill` writes a step's token ids, positions,
slots, sequence lengths, query offsets and block tables into buffers that live as long as the runner, through numpy
views of their memory: on this CPU each tensor made from Python costs ~3 us, 10-20 times that after a step's weight
stream has left the interpreter's code and data cold. The executors (runtime/executor.py) read the filled rows:
- `inputs()`: views of the filled rows as (input_ids, positions, AttentionMetadata), block tables as wide as the
  step's longest (at least 2 columns: torch.compile specialises a dimension of size 1), for the model's forward;
- `tensors()` / `outputs()`: the whole buffers, which our C++ step binds once (kernels/cpu/decoder.cpp) and whose
  first `rows` sequences, `num_tokens` tokens and `len(logit_index)` logit rows it reads (block tables
  `capacity_width` wide, filled with `bound=True`), writing those rows' logits and their argmax in place.
Rows past the filled ones, and block-table entries past a sequence's blocks, hold stale values that no step reads.
The buffers grow (and `version` changes, so that a decoder binds them again) when a step needs more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.runtime.sequence import Sequence


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


def is_decode(chunks: list[Chunk]) -> bool:
    """One new token per sequence, each wanting its logits, no prompt scoring."""
    return all(len(chunk.token_ids) == chunk.num_logits == 1 for chunk in chunks)


def scores_prompt(chunks: list[Chunk]) -> bool:
    """Some chunk scores its prompt positions (which needs their hidden states)."""
    return any(chunk.score_targets for chunk in chunks)


class StepBuffers:
    def __init__(self, vocab_size: int = 0, tokens: int = 8, seqs: int = 8, width: int = 32,
                 device: torch.device | str = "cpu", logit_rows: int = 8):
        """`vocab_size`: the logits buffer's width (0: no logits buffer, the executor makes its own); `device`: where
        `inputs()` puts the views (copies, off the CPU)."""
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.rows = 0  # sequences filled by the last `fill` (the C++ step's rows)
        self.num_tokens = 0
        self.width = 2  # the filled block tables' width
        self.max_seqlen_q = 0
        self.logit_index: list[int] = []  # packed token indices whose logits are wanted, chunk after chunk
        self.version = 0
        self._allocate(tokens, seqs, width, logit_rows)

    def _allocate(self, tokens: int, seqs: int, width: int, logit_rows: int) -> None:
        tokens = max(tokens, seqs)  # (every sequence has a token)
        self.input_ids = torch.zeros(tokens, dtype=torch.int64)
        self.positions = torch.zeros(tokens, dtype=torch.int64)
        self.slot_mapping = torch.zeros(tokens, dtype=torch.int64)
        self.seq_lens = torch.zeros(seqs, dtype=torch.int32)
        self.cu_seqlens_q = torch.zeros(seqs + 1, dtype=torch.int32)
        self.table_storage = torch.zeros(seqs * width, dtype=torch.int32)
        self.block_tables = self.table_storage.view(seqs, width)  # the C++ step's layout: `capacity_width` wide
        self.capacity_width = width
        self.logit_rows = torch.zeros(logit_rows, dtype=torch.int64)
        self.logits = torch.zeros(logit_rows if self.vocab_size else 0, self.vocab_size, dtype=torch.float32)
        self.tokens = torch.zeros(logit_rows, dtype=torch.int64)
        self._np = (self.input_ids.numpy(), self.positions.numpy(), self.slot_mapping.numpy(), self.seq_lens.numpy(),
                    self.cu_seqlens_q.numpy(), self.table_storage.numpy(), self.logit_rows.numpy())
        self._tokens = self.tokens.numpy()
        self._logits_rows: dict[int, torch.Tensor] = {}  # (views made once per row count: a slice costs ~3 us)
        self.version += 1

    def fill(self, chunks: list[Chunk], block_size: int, bound: bool = False) -> int:
        """Write the chunks' inputs; returns the number of sequences. `bound`: block tables in the bound layout
        (`capacity_width` wide, for the C++ step), else as wide as this step needs (for `inputs()`)."""
        num_tokens = sum(len(chunk.token_ids) for chunk in chunks)
        num_logits = sum(chunk.num_logits for chunk in chunks)
        longest = max(len(chunk.block_table) for chunk in chunks)
        seqs, width = self.block_tables.shape
        tokens, logit_rows = self.input_ids.numel(), self.logit_rows.numel()
        if num_tokens > tokens or len(chunks) > seqs or longest > width or num_logits > logit_rows:
            grow = (lambda need, have: have if need <= have else max(need, 2 * have))
            self._allocate(grow(num_tokens, tokens), grow(len(chunks), seqs), grow(longest, width),
                           grow(num_logits, logit_rows))
            width = self.capacity_width
        if not bound:
            width = max(2, longest)
        ids, positions, slots, lens, cu, tables, rows = self._np
        cu[0] = 0
        at = 0
        logit_index: list[int] = []
        for i, chunk in enumerate(chunks):
            n, start, table = len(chunk.token_ids), chunk.start, chunk.block_table
            if n == 1:  # (a decode row: scalar writes beat numpy's per-call cost)
                ids[at] = chunk.token_ids[0]
                positions[at] = start
                slots[at] = table[start // block_size] * block_size + start % block_size
            else:
                span = np.arange(start, start + n)
                ids[at:at + n] = chunk.token_ids
                positions[at:at + n] = span
                blocks = np.asarray(table, dtype=np.int64)[span // block_size]
                slots[at:at + n] = blocks * block_size + span % block_size
            at += n
            lens[i] = start + n
            cu[i + 1] = at
            tables[i * width:i * width + len(table)] = table
            if chunk.num_logits:
                rows[len(logit_index):len(logit_index) + chunk.num_logits] = range(at - chunk.num_logits, at)
                logit_index += range(at - chunk.num_logits, at)
        self.rows, self.num_tokens, self.width = len(chunks), num_tokens, width
        self.max_seqlen_q = max(len(chunk.token_ids) for chunk in chunks)
        self.logit_index = logit_index
        return self.rows

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids, positions and metadata of the filled step (filled with `bound=False`), on `device`."""
        t, s = self.num_tokens, self.rows
        on_cpu = self.device.type == "cpu"

        def view(x: torch.Tensor) -> torch.Tensor:
            return x if on_cpu else x.to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            cu_seqlens_q=view(self.cu_seqlens_q[:s + 1]), seq_lens=view(self.seq_lens[:s]),
            slot_mapping=view(self.slot_mapping[:t]),
            block_tables=view(self.table_storage[:s * self.width].view(s, self.width)),
            max_seqlen_q=self.max_seqlen_q, is_decode=self.max_seqlen_q == 1)
        return view(self.input_ids[:t]), view(self.positions[:t]), meta

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The C++ step's inputs: input_ids, positions, slot_mapping, block_tables, seq_lens, cu_seqlens_q and
        logit_rows (LlamaDecoder.bind_buffers takes them, then the rotary table, then `outputs()`)."""
        return (self.input_ids, self.positions, self.slot_mapping, self.block_tables, self.seq_lens, self.cu_seqlens_q,
                self.logit_rows)

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The C++ step's outputs: logits `[rows, vocab]` and the argmax of each row."""
        return self.logits, self.tokens

    def step_logits(self) -> torch.Tensor:
        """The last C++ step's logits `[len(logit_index), vocab]`: a view that the next step overwrites."""
        n = len(self.logit_index)
        view = self._logits_rows.get(n)
        if view is None:
            view = self._logits_rows[n] = self.logits[:n]
        return view

    def step_argmax(self) -> list[int]:
        """The last C++ step's argmax of each logits row."""
        return self._tokens[:len(self.logit_index)].tolist()
