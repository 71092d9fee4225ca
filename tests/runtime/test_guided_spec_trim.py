"""Speculative proposals of guided requests are cut before the first token the constraint forbids, with their
draft distributions' rows; unguided requests' proposals are untouched."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from llmengine_runtime.runtime.speculative.step import trim_to_constraints


class PrefixMatcher:
    """Allows tokens while they are below `limit` (a stand-in for a GuidedMatcher's valid_prefix_len)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.calls: list[list[int]] = []

    def valid_prefix_len(self, tokens: list[int]) -> int:
        self.calls.append(list(tokens))
        return next((j for j, t in enumerate(tokens) if t >= self.limit), len(tokens))


def test_guided_proposals_and_their_rows_are_cut():
    matcher = PrefixMatcher(10)
    seqs = [SimpleNamespace(matcher=None), SimpleNamespace(matcher=matcher), SimpleNamespace(matcher=matcher),
            SimpleNamespace(matcher=matcher)]
    proposals = [[50, 51], [1, 2, 30, 3], [40], []]
    draft_probs = torch.arange(7.0)[:, None].repeat(1, 3)  # row r holds r
    trimmed, probs = trim_to_constraints(seqs, proposals, draft_probs)
    assert trimmed == [[50, 51], [1, 2], [], []]
    assert probs[:, 0].tolist() == [0, 1, 2, 3]  # the unguided pair, then the two kept of the second
    assert matcher.calls == [[1, 2, 30, 3], [40]]  # empty proposals are not asked about


def test_point_mass_proposals_stay_none_and_nothing_cut_keeps_the_tensor():
    seqs = [SimpleNamespace(matcher=PrefixMatcher(100))]
    assert trim_to_constraints(seqs, [[1, 2]], None) == ([[1, 2]], None)
    probs = torch.ones(2, 4)
    assert trim_to_constraints(seqs, [[1, 2]], probs)[1] is probs
