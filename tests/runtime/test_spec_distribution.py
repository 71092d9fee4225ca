"""The whole speculative engine path samples from the target's distribution: many unseeded requests of three tokens
after one prompt, the second token always proposed (by a proposer that proposes from a fixed distribution q,
or as a point mass), against the joint distribution p(t1) p(t2 | t1) computed from the model directly (Pearson's
chi-square); the same test fails for two known-wrong acceptance rules."""

from __future__ import annotations

import pytest
import torch

import llmengine_runtime.runtime.speculative.verify as verify_module
from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.sampler import final_logits
from tests.runtime.spec_helpers import make_engine

pytestmark = pytest.mark.slow  # thousands of seeded draws; test_spec_verify.py checks the rule fast

# Chi-square critical values at alpha = 1e-4 (upper tail), by degrees of freedom.
CHI2_CRITICAL = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745, 6: 27.856, 7: 29.878, 8: 31.828, 9: 33.72,
                 10: 35.564, 11: 37.367, 12: 39.134, 13: 40.871, 14: 42.579, 15: 44.263}
PROMPT = [11, 12, 13, 14, 15, 16]
PARAMS = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=4, ignore_eos=True)
NUM_DRAWS = 1200


class FixedProposer:
    """Always proposes (one token per unit of room) from q; draft_probs None makes each a point mass instead."""

    def __init__(self, q: torch.Tensor, point_mass: bool):
        self.q, self.point_mass = q, point_mass

    def propose_seqs(self, seqs, max_tokens):
        proposals = [torch.multinomial(self.q, room, replacement=True).tolist() for room in max_tokens]
        rows = sum(max_tokens)
        return proposals, None if self.point_mass else self.q.repeat(rows, 1)


def next_distribution(engine, token_ids: list[int]) -> torch.Tensor:
    """The target's final distribution (top-k 4, temperature 1) for the token after token_ids, computed without
    the engine."""
    model = engine.model
    with torch.inference_mode():
        meta = AttentionMetadata.for_prompts([len(token_ids)])
        hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), meta)
        logits = model.compute_logits(hidden[-1:]).float()
    return final_logits(logits, [PARAMS], [[]])[0].softmax(-1)


def draw_pairs(engine, num: int) -> list[tuple[int, int]]:
    """(t1, t2) of `num` requests: t1 from the prefill step, t2 the first token of the speculating step."""
    seqs = [engine.add_request(PROMPT, PARAMS) for _ in range(num)]
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_used == 0
    return [(s.output_token_ids[0], s.output_token_ids[1]) for s in seqs]


def chi_square(pairs: list[tuple[int, int]], p1: torch.Tensor, p2: dict[int, torch.Tensor]) -> tuple[float, int]:
    """Pearson's statistic of the pairs against p1(t1) p2[t1](t2) over the support, and its degrees of freedom. A
    pair outside the support fails at once."""
    cells = {(a, b): float(p1[a] * p2[a][b]) for a in p2 for b in range(len(p2[a])) if p2[a][b] > 0}
    observed = dict.fromkeys(cells, 0)
    for pair in pairs:
        assert pair in observed, f"{pair} has zero target probability"
        observed[pair] += 1
    n = len(pairs)
    return sum((observed[c] - n * e) ** 2 / (n * e) for c, e in cells.items()), len(cells) - 1


@pytest.fixture(scope="module")
def folder(tiny_dir):
    return tiny_dir("llama-mha")


def target_and_q(engine) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    p1 = next_distribution(engine, PROMPT)
    p2 = {int(a): next_distribution(engine, PROMPT + [int(a)]) for a in p1.nonzero().flatten()}
    # q, unlike p: 0.6 on the likeliest second token, 0.1 over the others the target may emit, 0.3 on two it never
    # does (p = 0). A rule that resamples from p (not the residual) then emits the likeliest one too often.
    second = sum(p1[a] * dist for a, dist in p2.items())
    support = second.nonzero().flatten()
    q = torch.zeros(engine.config.vocab_size)
    q[support] = 0.1 / len(support)
    q[int(second.argmax())] += 0.6
    q[[3, 4]] += 0.15
    assert second[[3, 4]].sum() == 0
    return p1, p2, q / q.sum()


def speculating_engine(folder, cache_gib, point_mass: bool):
    engine = make_engine(folder, cache_gib, num_blocks=1200, max_num_seqs=384, speculative="ngram")
    p1, p2, q = target_and_q(engine)
    engine.speculator.proposer = FixedProposer(q, point_mass)
    return engine, p1, p2


@pytest.mark.parametrize("point_mass", [False, True])
def test_speculative_sampling_reproduces_the_target_distribution(folder, cache_gib, point_mass):
    engine, p1, p2 = speculating_engine(folder, cache_gib, point_mass)
    assert len(p1.nonzero()) == 4
    torch.manual_seed(0)
    pairs = draw_pairs(engine, NUM_DRAWS)
    stats = engine.stats()
    assert stats["spec_steps"] == NUM_DRAWS  # every request's second token went through verification
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]  # both branches taken
    statistic, df = chi_square(pairs, p1, p2)
    assert statistic < CHI2_CRITICAL[df]


@pytest.mark.parametrize("wrong_rule", ["always accept", "resample from p"])
def test_the_same_test_fails_for_a_wrong_rule(folder, cache_gib, monkeypatch, wrong_rule):
    if wrong_rule == "always accept":
        monkeypatch.setattr(verify_module, "accept_draft", lambda u, p_x, q_x: torch.ones_like(p_x, dtype=torch.bool))
    else:
        monkeypatch.setattr(verify_module, "residual_distribution", lambda p, q: p)
    engine, p1, p2 = speculating_engine(folder, cache_gib, point_mass=False)
    torch.manual_seed(0)
    pairs = draw_pairs(engine, NUM_DRAWS)
    try:
        statistic, df = chi_square(pairs, p1, p2)
    except AssertionError:  # a token of zero target probability came out: wrong at once
        return
    assert statistic > CHI2_CRITICAL[df]
