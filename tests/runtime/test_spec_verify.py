"""Speculative verification: greedy against a plain loop, the rejection sampler against the target distribution
(chi-square goodness of fit, and the same test failing for wrong rules), seeding, and the helpers."""

from __future__ import annotations

import random

import pytest
import torch

import llmengine_runtime.runtime.speculative.verify as verify_module
from llmengine_runtime.runtime.greedy import greedy_rows
from llmengine_runtime.runtime.speculative import (
    accept_draft,
    draw_inverse_cdf,
    output_ids_per_row,
    repeat_per_row,
    residual_distribution,
    verify_proposals,
)
from llmengine_runtime.runtime.speculative.verify import accept_greedy
from tests.fast import fast_subset

# Chi-square critical values at alpha = 1e-4 (upper tail), from the regularised incomplete gamma function.
CHI2_CRITICAL = {10: 35.564}
VOCAB = 12


def greedy_reference(rows: torch.Tensor, drafts: list[int]) -> tuple[list[int], list[float]]:
    log_probs = torch.log_softmax(rows, dim=-1)
    emitted = []
    for j, token in enumerate(drafts):
        if token != int(log_probs[j].argmax()):
            break
        emitted.append(token)
    emitted.append(int(log_probs[len(emitted)].argmax()))
    return emitted, [float(log_probs[j, t]) for j, t in enumerate(emitted)]


def test_greedy_matches_a_plain_loop_on_random_logits():
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(20):
        num_draft = [rng.randint(0, 5) for _ in range(rng.randint(1, 8))]
        logits = torch.randn(sum(num_draft) + len(num_draft), 50) * 3
        drafts, start = [], 0
        for k in num_draft:
            argmax = logits[start:start + k].argmax(-1).tolist()
            accept = rng.randint(0, k)  # agree with the target for this many, then mostly disagree
            drafts.append(argmax[:accept] + [rng.randrange(50) for _ in range(k - accept)])
            start += k + 1
        tokens, log_probs = verify_proposals(logits, drafts, [True] * len(drafts))
        start = 0
        for k, d, got_tokens, got_log_probs in zip(num_draft, drafts, tokens, log_probs):
            want_tokens, want_log_probs = greedy_reference(logits[start:start + k + 1], d)
            assert got_tokens == want_tokens
            assert got_log_probs == pytest.approx(want_log_probs, abs=1e-5)
            start += k + 1


def random_greedy_case(rng: random.Random, vocab: int = 50) -> tuple[torch.Tensor, list[list[int]]]:
    """Packed logits and proposals that agree with each row's argmax for a random number of rows, then not."""
    num_draft = [rng.randint(0, 5) for _ in range(rng.randint(1, 8))]
    logits = torch.randn(sum(num_draft) + len(num_draft), vocab) * 3
    drafts, start = [], 0
    for k in num_draft:
        argmax = logits[start:start + k].argmax(-1).tolist()
        accept = rng.randint(0, k)
        drafts.append(argmax[:accept] + [(t + rng.randrange(1, vocab)) % vocab for t in argmax[accept:]])
        start += k + 1
    return logits, drafts


def test_accept_greedy_from_the_argmax_rows_is_verify_proposals_to_the_bit():
    rng = random.Random(1)
    torch.manual_seed(1)
    accepted = 0
    for _ in range(30):
        logits, drafts = random_greedy_case(rng)
        want_tokens, want_log_probs = verify_proposals(logits, drafts, [True] * len(drafts))
        row_argmax, row_log_probs = greedy_rows(logits)
        tokens, log_probs = accept_greedy(row_argmax.tolist(), row_log_probs.tolist(), drafts)
        assert tokens == want_tokens and log_probs == want_log_probs
        accepted += sum(len(t) - 1 for t in tokens)
    assert accepted > 30  # the cases accept runs of proposals, not only the first row's token
    with pytest.raises(ValueError, match="expected 4 rows"):
        accept_greedy([1, 2, 3], [0.0] * 3, [[1, 2, 3]])


def draws(p: torch.Tensor, q: torch.Tensor, num_seqs: int, point_mass: bool = False,
          seeded: bool = False) -> list[list[int]]:
    """Emitted tokens of num_seqs sequences, each with len(q) proposals drawn from q, verified against p
    (rows `[k + 1, V]`, the same for every sequence): one batched call, with the default generator or one
    seeded generator per sequence."""
    k = len(q)
    proposals = torch.stack([torch.multinomial(q[j], num_seqs, replacement=True) for j in range(k)], dim=1)
    logits = p.log().repeat(num_seqs, 1)  # log(0) = -inf: a token top-k/top-p removed
    draft_probs = None if point_mass else q.repeat(num_seqs, 1)
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(num_seqs)] if seeded else None
    tokens, _ = verify_proposals(logits, proposals.tolist(), [False] * num_seqs, generators, draft_probs)
    return tokens


def chi_square(samples: list[int], p: torch.Tensor) -> float:
    """Pearson's statistic of samples against p over p's support (a sample outside it fails at once)."""
    observed = torch.bincount(torch.tensor(samples), minlength=len(p)).double()
    support = p > 0
    assert observed[~support].sum() == 0, "a token with zero target probability was emitted"
    expected = len(samples) * p.double()[support]
    return float(((observed[support] - expected) ** 2 / expected).sum())


def target_and_draft(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three target rows (two proposals and the bonus) and two draft rows over VOCAB tokens, each target row
    with one zero (as top-k leaves), the draft with a zero where the target has mass (q(x) = 0)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(3, VOCAB, generator=g) ** 2 + 0.02
    p[0, 3] = p[1, 7] = p[2, 0] = 0
    q = torch.rand(2, VOCAB, generator=g) ** 2 + 0.02
    q[:, 5] = 0
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


NUM_DRAWS = 40_000


@pytest.mark.parametrize("point_mass, seeded", fast_subset([(False, False), (True, False), (False, True)],
                                                         [(False, False)]))
def test_rejection_sampling_reproduces_the_target_distribution(point_mass, seeded):
    p, q = target_and_draft(0)
    torch.manual_seed(1)
    tokens = draws(p, q, NUM_DRAWS, point_mass, seeded)
    assert len(set(map(len, tokens))) == 3  # some rejected at once, some after one, some took the bonus token
    assert chi_square([t[0] for t in tokens], p[0]) < CHI2_CRITICAL[10]
    # Given the first proposal was accepted, the second emitted token follows the second row.
    second = [t[1] for t in tokens if len(t) >= 2]
    assert len(second) > 2000  # a point mass is accepted less often (about 1 in 12 here)
    assert chi_square(second, p[1]) < CHI2_CRITICAL[10]


def test_a_point_mass_rejection_never_emits_the_rejected_token():
    p, q = target_and_draft(2)
    torch.manual_seed(3)
    proposals = [[t] for t in torch.multinomial(q[0], 2000, replacement=True).tolist()]
    tokens, _ = verify_proposals(p[0].log().repeat(2 * 2000, 1), proposals, [False] * 2000)
    rejected = [(t, d[0]) for t, d in zip(tokens, proposals) if len(t) == 1]
    assert rejected and all(t[0] != d for t, d in rejected)
    assert all(t[0] == d[0] for t, d in zip(tokens, proposals) if len(t) == 2)


@pytest.mark.parametrize("wrong_rule", fast_subset(["always accept", "resample from p"], ["always accept"]))
@pytest.mark.parametrize("point_mass", [False, True])
def test_the_same_test_catches_wrong_rules(monkeypatch, wrong_rule, point_mass):
    if wrong_rule == "always accept":
        monkeypatch.setattr(verify_module, "accept_draft", lambda u, p_x, q_x: torch.ones_like(p_x, dtype=torch.bool))
    else:
        monkeypatch.setattr(verify_module, "residual_distribution", lambda p, q: p)
    p, q = target_and_draft(0)
    torch.manual_seed(1)
    first = [t[0] for t in draws(p, q, NUM_DRAWS, point_mass)]
    observed = torch.bincount(torch.tensor(first), minlength=VOCAB)
    support = p[0] > 0
    wrong_support = bool(observed[~support].sum())  # "always accept" emits q's tokens, which p may not allow
    assert wrong_support or chi_square(first, p[0]) > CHI2_CRITICAL[10]


def test_k_zero_is_a_plain_draw_from_p():
    p, _ = target_and_draft(4)
    torch.manual_seed(5)
    tokens, _ = verify_proposals(p[0].log().repeat(NUM_DRAWS, 1), [[]] * NUM_DRAWS, [False] * NUM_DRAWS)
    assert set(map(len, tokens)) == {1}
    assert chi_square([t[0] for t in tokens], p[0]) < CHI2_CRITICAL[10]


def test_log_probs_are_of_each_emitted_token_under_its_row():
    torch.manual_seed(0)
    num_draft = [3, 0, 2, 4]
    logits = torch.randn(sum(num_draft) + len(num_draft), 6)
    drafts = [torch.randint(0, 6, (k,)).tolist() for k in num_draft]
    tokens, log_probs = verify_proposals(logits, drafts, [False, True, False, False])
    log_softmax = torch.log_softmax(logits, -1)
    start = 0
    for k, d, emitted, lps in zip(num_draft, drafts, tokens, log_probs):
        assert 1 <= len(emitted) <= k + 1 and emitted[:-1] == d[:len(emitted) - 1]
        want = [float(log_softmax[start + j, t]) for j, t in enumerate(emitted)]
        assert lps == pytest.approx(want, abs=1e-6)
        start += k + 1


def test_seeded_sequences_are_reproducible_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 5) * 0.5  # three proposals and a bonus row, probabilities near 1/5
    drafts = [0, 1, 2]

    def alone(seed: int) -> list[int]:
        return verify_proposals(logits, [drafts], [False], [torch.Generator().manual_seed(seed)])[0][0]

    batch_logits = torch.cat([torch.randn(2, 5), logits, logits, torch.randn(1, 5)])
    generators = [None, torch.Generator().manual_seed(11), torch.Generator().manual_seed(12), None]
    batch = verify_proposals(batch_logits, [[3], drafts, drafts, []], [False, False, False, True], generators)[0]
    assert batch[1] == alone(11) == alone(11) and batch[2] == alone(12)
    assert len({tuple(alone(seed)) for seed in range(30)}) > 3  # the seed matters


def test_mixed_batch_gives_each_sequence_its_own_rule():
    torch.manual_seed(0)
    logits = torch.randn(7, 9)
    drafts = [[int(logits[0].argmax()), 4], [1, 2, 3]]
    greedy_alone = verify_proposals(logits[:3], drafts[:1], [True])
    sampled_alone = verify_proposals(logits[3:], drafts[1:], [False], [torch.Generator().manual_seed(5)])
    generators = [torch.Generator().manual_seed(9), torch.Generator().manual_seed(5)]  # greedy draws nothing
    mixed = verify_proposals(logits, drafts, [True, False], generators)
    assert mixed[0] == greedy_alone[0] + sampled_alone[0]
    assert sum(mixed[1], []) == pytest.approx(sum(greedy_alone[1] + sampled_alone[1], []), abs=1e-6)


def test_acceptance_and_residual_edge_cases():
    u = torch.tensor([0.0, 0.5, 0.999, 0.0, 0.3])
    p_x = torch.tensor([0.2, 0.2, 0.2, 0.0, 0.0])
    q_x = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.4])
    assert accept_draft(u, p_x, q_x).tolist() == [True, False, True, False, False]  # q(x) = 0 accepts, p(x) = 0 not
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.6, 0.3]])
    got = residual_distribution(p, q).tolist()
    assert got[0] == [0.5, 0.5, 0.0] and got[1] == pytest.approx([1 / 3, 0.0, 2 / 3], abs=1e-6)  # p = q: p itself


def test_inverse_cdf_draws_never_pick_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.0, 0.3, 0.0, 0.7, 0.0]] * 5)
    u = torch.tensor([0.0, 0.29, 0.31, 1 - 1e-16, 1.0], dtype=torch.float64)  # 1.0: as if u * total rounded up
    assert draw_inverse_cdf(probs, u).tolist() == [2, 2, 4, 4, 4]


def test_penalty_rows_see_the_proposals_before_them():
    assert output_ids_per_row([7, 8], [1, 2, 3]) == [[7, 8], [7, 8, 1], [7, 8, 1, 2], [7, 8, 1, 2, 3]]
    assert output_ids_per_row([], []) == [[]]
    assert repeat_per_row(["a", "b", "c"], [2, 0, 1]) == ["a", "a", "a", "b", "c", "c"]


def test_rejects_inconsistent_shapes():
    with pytest.raises(ValueError):
        verify_proposals(torch.randn(3, 4), [[1, 2], [3]], [True, True])
    with pytest.raises(ValueError):
        verify_proposals(torch.randn(3, 4), [[1, 2]], [False], draft_probs=torch.rand(1, 4))
    assert verify_proposals(torch.randn(0, 4), [], []) == ([], [])
