"""Speculative decoding: cheap proposals for the next tokens, checked by one forward pass of the target model.

Each step, for every speculating sequence, the engine:

1. asks the proposer for up to k tokens: `proposer.propose_batch(token_ids, max_tokens)` with each sequence's
   token ids (a list, or the array of its `TokenHistory`) and a cap, one less than the tokens it may still emit
   (verification adds a token of its own), and gets back the proposals (a list of ints per sequence, possibly
   empty) and their draft distributions packed as `[sum(k_i), V]` (a draft model) or None (point masses: n-gram);
2. feeds the sequence's last token plus its k_i proposals to the target model as one chunk, keeping the k_i + 1
   rows of logits, packed over sequences as `[sum(k_i + 1), V]`;
3. turns them into the sampler's final logits row by row (penalties with `output_ids_per_row`, temperature,
   top-k, top-p; `repeat_per_row` expands per-sequence parameters);
4. calls `verify_proposals(logits, proposals, greedy, generators, draft_probs)` and appends the 1..k_i + 1 emitted
   tokens and their log-probs, giving back the KV cache slots of the rejected proposals.

Proposers are plain classes that fit `Proposer`: `NgramProposer` here; a draft-model proposer (draft.py) and an
EAGLE-style one will be further files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from llmengine_runtime.runtime.speculative.ngram import NgramProposer, TokenHistory
from llmengine_runtime.runtime.speculative.verify import (
    accept_draft,
    draw_inverse_cdf,
    output_ids_per_row,
    repeat_per_row,
    residual_distribution,
    verify_proposals,
)


class Proposer(Protocol):
    num_speculative_tokens: int

    def propose_batch(self, token_ids: list[Sequence[int] | np.ndarray],
                      max_tokens: list[int] | None = None) -> tuple[list[list[int]], torch.Tensor | None]:
        """Up to min(num_speculative_tokens, max_tokens[i]) proposals per sequence, and the distributions they
        were drawn from, `[sum(k_i), V]` packed in sequence order (None: each is a point mass)."""
        ...


__all__ = ["NgramProposer", "Proposer", "TokenHistory", "accept_draft", "draw_inverse_cdf", "output_ids_per_row",
           "repeat_per_row", "residual_distribution", "verify_proposals"]
