"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step mixes the decode tokens of running sequences with prefill chunks, within
`max_num_batched_tokens` tokens and `max_num_seqs` sequences, first come first served. A sequence takes
as many of its uncomputed tokens as the budget leaves (a long prompt is prefilled over several steps).
When the cache has no block for a running sequence, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the waiting queue, to be recomputed from its prompt
and generated tokens. The oldest running sequence is never starved (a request is only accepted if it
fits the whole cache alone), so the engine always makes progress.

With prefix caching, a sequence being admitted first takes the cached blocks of its longest cached
prefix (a preempted one often finds its own); only the tokens after them are computed and budgeted. A waiting
sequence whose next reusable block a running one is computing right now (copies of one prompt, OpenAI's `n`) waits
for it instead of computing it too (runtime/prefix_sharing.py); the sequences behind it may go first meanwhile.

With speculative decoding (`lookahead`), a sequence in decode (all its tokens computed but the last) may get
room for up to `lookahead(seq)` proposals after its last token: slots and budget, taken last, from what the
step's own tokens and the admissions left. Speculation never preempts and never delays an admission; with no
room the sequence decodes plainly. Its entry is then (seq, 1 + room); the engine trims it to 1 + the
proposals actually made, and after verification gives back the blocks past the accepted tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from llmengine_runtime.runtime.block_manager import BlockManager
from llmengine_runtime.runtime.prefix_sharing import computed_soon_by_another
from llmengine_runtime.runtime.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: Callable[[Sequence], int] | None = None):
        self.block_manager = block_manager
        self.lookahead = lookahead
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step: (sequence, number of new tokens), with blocks already allocated for them."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the newest; never one already in this batch
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                batch.append((seq, n))
                budget -= n
                i += 1
        # Admit waiting sequences, oldest first, unless blocks just ran out. A sequence starts from the
        # longest prefix the cache holds; only the rest costs budget and new blocks.
        bm = self.block_manager
        held: list[Sequence] = []  # waiting for blocks a running copy of their prompt is computing
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = bm.cached_prefix(seq)
            if bm.enable_prefix_caching and not seq.params.prompt_log_probs \
                    and computed_soon_by_another(seq, len(prefix), self.running, bm.block_size):
                held.append(self.waiting.popleft())
                continue
            start = len(prefix) * bm.block_size  # a waiting sequence holds no block and computed nothing
            n = min(seq.num_tokens - start, budget)
            if not bm.can_allocate(seq, start + n, prefix):
                break
            self.waiting.popleft()
            bm.reuse(seq, prefix)
            bm.allocate(seq, start + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(held))
        if self.lookahead is not None:
            self.grant_lookahead(batch, budget)
        return batch

    def grant_lookahead(self, batch: list[tuple[Sequence, int]], budget: int) -> None:
        """Room for proposals after each sequence in decode, from the budget and blocks left, in batch order:
        (seq, 1) becomes (seq, 1 + room). Less room than asked when that is all there is; none, plain decoding."""
        bm = self.block_manager
        for i, (seq, n) in enumerate(batch):
            if budget <= 0:
                break
            if n != 1 or seq.num_uncomputed_tokens != 1:
                continue
            capacity = (len(seq.block_table) + bm.num_free) * bm.block_size  # slots it could have
            room = min(self.lookahead(seq), budget, capacity - seq.num_tokens)
            if room > 0:
                bm.allocate(seq, seq.num_tokens + room)
                batch[i] = (seq, 1 + room)
                budget -= room

    def preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.proposer_state = None
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of its queue and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
