"""The n-gram proposer against its rules and a plain-Python reference, and the per-sequence token history."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llmengine_runtime.runtime.speculative import NgramProposer, TokenHistory


def reference(tokens: list[int], k: int, n_min: int, n_max: int, max_tokens: int | None = None) -> list[int]:
    """Longest n first; for it the latest start i whose n tokens equal the suffix and end before the last token."""
    limit = k if max_tokens is None else min(k, max_tokens)
    if limit <= 0:
        return []
    length = len(tokens)
    for n in range(n_max, n_min - 1, -1):
        pattern = tokens[length - n:]
        for i in range(length - n - 1, -1, -1):
            if tokens[i:i + n] == pattern:
                return tokens[i + n:i + n + limit]
    return []


def test_the_latest_earlier_occurrence_wins():
    assert NgramProposer(1, 1, 2).propose([1, 2, 9, 1, 2, 8, 1, 2]) == [8]
    assert NgramProposer(3, 1, 2).propose([1, 2, 9, 1, 2, 8, 1, 2]) == [8, 1, 2]


def test_the_longest_n_wins_over_a_later_shorter_match():
    tokens = [1, 2, 10, 9, 2, 11, 1, 2]  # [1, 2] last at 0 (then 10); [2] last at 4 (then 11)
    assert NgramProposer(1, 1, 2).propose(tokens) == [10]
    assert NgramProposer(1, 1, 1).propose(tokens) == [11]
    assert NgramProposer(1, 2, 4).propose([5, 3, 7, 3]) == []  # only a 1-gram matches: below prompt_lookup_min


def test_never_matches_the_suffix_itself():
    proposer = NgramProposer(4, 1, 4)
    assert proposer.propose([]) == []
    assert proposer.propose([7]) == []
    assert proposer.propose([1, 2, 3]) == []
    assert proposer.propose([3, 3]) == [3]  # the occurrence at 0 ends before the last token
    assert proposer.propose([4, 4, 4, 4]) == [4]  # [4, 4, 4] at 0 overlaps the suffix; one token follows it


def test_proposals_stop_at_the_end_of_the_sequence_and_at_max_tokens():
    assert NgramProposer(5, 1, 1).propose([1, 2, 3, 1]) == [2, 3, 1]
    proposer = NgramProposer(3, 1, 2)
    tokens = [1, 2, 3, 4, 5, 6, 1]
    assert proposer.propose(tokens) == [2, 3, 4]
    assert proposer.propose(tokens, max_tokens=2) == [2, 3]
    assert proposer.propose(tokens, max_tokens=9) == [2, 3, 4]
    assert proposer.propose(tokens, max_tokens=0) == []


def test_nothing_matches_gives_no_proposal():
    assert NgramProposer(3).propose(list(range(100))) == []
    assert NgramProposer(3).propose(np.arange(100)) == []


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_plain_python_reference_on_random_sequences(seed):
    rng = random.Random(seed)
    for _ in range(500):
        vocab, length = rng.randint(2, 6), rng.randint(0, 60)
        tokens = [rng.randrange(vocab) for _ in range(length)]
        k, n_min = rng.randint(1, 5), rng.randint(1, 4)
        n_max = rng.randint(n_min, 6)
        max_tokens = rng.choice([None, rng.randint(0, 6)])
        proposer = NgramProposer(k, n_min, n_max)
        want = reference(tokens, k, n_min, n_max, max_tokens)
        assert proposer.propose(tokens, max_tokens) == want, (tokens, k, n_min, n_max, max_tokens)
        assert proposer.propose(np.array(tokens, dtype=np.int64), max_tokens) == want


def test_long_sequences_match_the_reference():
    rng = random.Random(7)
    tokens = [rng.randrange(40) for _ in range(3000)]
    for n_max in (1, 2, 3, 5):
        assert NgramProposer(6, 1, n_max).propose(tokens) == reference(tokens, 6, 1, n_max)


def test_propose_batch_returns_no_draft_distribution():
    proposer = NgramProposer(2)
    proposals, draft_probs = proposer.propose_batch([[1, 2, 1], [5, 6], [3, 4, 5, 3]], [2, 2, 1])
    assert proposals == [[2, 1], [], [4]] and draft_probs is None


def test_token_history_follows_a_growing_output_list():
    rng = random.Random(0)
    prompt = [rng.randrange(50) for _ in range(10)]
    history, outputs = TokenHistory(prompt), []
    for step in range(100):
        outputs += [rng.randrange(50) for _ in range(rng.randint(0, 5))]  # grows past the first buffer
        tokens = history.update(outputs)
        assert tokens.tolist() == prompt + outputs and len(history) == len(prompt) + len(outputs)
        if step % 10 == 0:
            assert NgramProposer(3).propose(tokens) == reference(prompt + outputs, 3, 1, 4)
    del outputs[-3:]
    assert history.update(outputs).tolist() == prompt + outputs
    assert TokenHistory([]).update([4, 4]).tolist() == [4, 4]


def test_rejects_bad_settings():
    for args in ((0,), (2, 0, 3), (2, 3, 2)):
        with pytest.raises(ValueError):
            NgramProposer(*args)
