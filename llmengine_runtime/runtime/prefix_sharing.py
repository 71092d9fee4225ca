"""Copies of one prompt admitted together share its prefill: a later copy waits for the blocks an earlier one is
computing, then finds them in the prefix cache.

The prefix cache registers a block only once its tokens are computed, so n requests with the same prompt admitted
in the same step (OpenAI's `n`, server/choices.py) would all miss and each prefill the whole prompt. The scheduler
instead holds a waiting sequence back while a running sequence is about to compute the next block the waiting one
could reuse (same tokens from the start through that block, not computed yet). Once that block is computed (after
that step, `cache_full_blocks`), the waiting sequence's cached prefix grows; it is admitted when nothing it could
reuse is still being computed, and then computes only the tokens after the shared blocks. The hold lasts while the
leader makes progress: a leader that finishes, is aborted or is preempted stops holding anyone back.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmengine_runtime.runtime.sequence import Sequence


def computed_soon_by_another(seq: Sequence, num_cached_blocks: int, running: Iterable[Sequence],
                             block_size: int) -> bool:
    """Whether a sequence in `running` holds, uncomputed, the block of `seq`'s tokens right after its
    `num_cached_blocks` cached ones (one `seq` could reuse: it never reuses the block of its last token)."""
    end = (num_cached_blocks + 1) * block_size
    if end > seq.num_tokens - 1:
        return False
    head = None
    for other in running:
        if other.num_computed_tokens < end <= other.num_tokens:
            head = head if head is not None else seq.token_ids(0, end)
            if other.token_ids(0, end) == head:
                return True
    return False
