"""N-gram ("prompt lookup") proposals: guess the next tokens by finding the sequence's own last tokens earlier on.

For n from `prompt_lookup_max` down to `prompt_lookup_min`, the last n tokens are the pattern. Its latest earlier
occurrence (one ending before the last token, so never the suffix itself; it may overlap the suffix) is found,
and the tokens that followed it are proposed: up to `num_speculative_tokens`, fewer where the sequence ends or
`max_tokens` says so. The longest n with a match wins; no match anywhere proposes nothing.

The search is a few numpy comparisons over the whole sequence (tens of microseconds for 8k tokens). Turning a
Python list of 8k ints into an array costs more than that, so an engine keeps one `TokenHistory` per sequence
and passes its array, which grows by the few new tokens of each step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TokenHistory:
    """A growing numpy copy of one sequence's token ids (prompt, then outputs)."""

    def __init__(self, prompt_token_ids: Sequence[int]):
        self.num_prompt_tokens = len(prompt_token_ids)
        self._length = self.num_prompt_tokens
        self._buffer = np.empty(max(64, 2 * self._length), dtype=np.int64)
        self._buffer[:self._length] = prompt_token_ids

    def update(self, output_token_ids: Sequence[int]) -> np.ndarray:
        """Catch up with the sequence's output list (which only grows) and return all its token ids: a view,
        valid until the next update."""
        num_seen = self._length - self.num_prompt_tokens
        new = output_token_ids[num_seen:]
        self._length = self.num_prompt_tokens + min(num_seen, len(output_token_ids))  # outputs cut back: follow
        end = self._length + len(new)
        if end > len(self._buffer):
            grown = np.empty(2 * end, dtype=np.int64)
            grown[:self._length] = self._buffer[:self._length]
            self._buffer = grown
        self._buffer[self._length:end] = new
        self._length = end
        return self._buffer[:end]

    def __len__(self) -> int:
        return self._length


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int = 1, prompt_lookup_max: int = 4):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens}: accepted an integer >= 1")
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={prompt_lookup_min}, prompt_lookup_max={prompt_lookup_max}: "
                             "accepted 1 <= min <= max")
        self.num_speculative_tokens = num_speculative_tokens
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max

    def propose(self, token_ids: Sequence[int] | np.ndarray, max_tokens: int | None = None) -> list[int]:
        """Up to min(num_speculative_tokens, max_tokens) tokens that followed the latest earlier occurrence of
        the longest matching suffix; [] when no suffix of length >= prompt_lookup_min occurs earlier."""
        limit = self.num_speculative_tokens if max_tokens is None else min(self.num_speculative_tokens, max_tokens)
        tokens = token_ids if isinstance(token_ids, np.ndarray) else \
            np.fromiter(token_ids, dtype=np.int64, count=len(token_ids))
        length = len(tokens)
        if limit <= 0 or length < self.prompt_lookup_min + 1:
            return []
        # ends[p]: an occurrence of the last n tokens ends at position p (p <= length - 2: not the suffix itself).
        # Growing n by one drops the first candidate and checks one more token further back.
        ends = tokens[:length - 1] == tokens[length - 1]
        first_end, best_end = 0, -1
        for n in range(1, min(self.prompt_lookup_max, length - 1) + 1):
            if n > 1:
                ends = ends[1:] & (tokens[:length - n] == tokens[length - n])
                first_end += 1
            if not ends.any():
                break
            if n >= self.prompt_lookup_min:
                best_end = first_end + len(ends) - 1 - int(ends[::-1].argmax())
        if best_end < 0:
            return []
        return tokens[best_end + 1:best_end + 1 + limit].tolist()

    def propose_batch(self, token_ids: list[Sequence[int] | np.ndarray],
                      max_tokens: list[int] | None = None) -> tuple[list[list[int]], None]:
        """`propose` for each sequence; n-gram proposals have no draft distribution (a point mass: None)."""
        limits = max_tokens if max_tokens is not None else [None] * len(token_ids)
        return [self.propose(ids, limit) for ids, limit in zip(token_ids, limits)], None
