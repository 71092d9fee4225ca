"""The sampler's logits processing and draws, on synthetic logits."""

from __future__ import annotations

import torch

from llmengine_runtime.runtime.detokenizer import TextStream
from llmengine_runtime.runtime.params import SamplingParams
from llmengine_runtime.runtime.sampler import Sampler, apply_penalties, apply_top_k_top_p
from llmengine_runtime.runtime.sequence import Sequence


def seq(params: SamplingParams, output: list[int] = ()) -> Sequence:
    s = Sequence("r", [0], params, TextStream(None, [], [], False, True))
    s.output_token_ids = list(output)
    if params.seed is not None:
        s.generator = torch.Generator().manual_seed(params.seed)
    return s


def test_penalties_follow_openai_formula_exactly():
    logits = torch.randn(3, 10)
    outputs = [[1, 1, 4], [], [9]]
    presence = torch.tensor([0.5, 1.0, -0.25])
    frequency = torch.tensor([0.3, 2.0, 1.5])
    got = apply_penalties(logits, outputs, presence, frequency)
    want = logits.clone()
    for row, ids in enumerate(outputs):
        for token in set(ids):
            count = ids.count(token)
            want[row, token] -= presence[row] * 1 + frequency[row] * count
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    untouched = torch.ones(3, 10, dtype=torch.bool)
    untouched[0, [1, 4]] = untouched[2, 9] = False
    assert torch.equal(got[untouched], logits[untouched])


def test_sampler_applies_penalties_before_greedy_argmax():
    logits = torch.tensor([[0.0, 5.0, 4.5, 1.0]])
    plain = Sampler()(logits, [seq(SamplingParams(), output=[1])])[0]
    penalised = Sampler()(logits, [seq(SamplingParams(presence_penalty=1.0), output=[1])])[0]
    assert plain == [1] and penalised == [2]  # 5.0 - 1.0 < 4.5


def test_top_k_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    out = apply_top_k_top_p(logits, torch.tensor([2, 4, 1]), torch.tensor([1.0, 0.65, 1.0]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [False, True, False, True]  # top-2
    assert kept[1].tolist() == [False, True, False, True]  # 0.4 + 0.3 >= 0.65
    assert kept[2].tolist() == [True, False, False, False]  # a tie keeps the lowest id, as argmax does
    assert torch.equal(out[kept], logits[kept])


def test_top_k_1_equals_greedy_and_logprobs_are_of_the_sampled_distribution():
    torch.manual_seed(0)
    logits = torch.randn(6, 500) * 3
    greedy, greedy_lp = Sampler()(logits, [seq(SamplingParams()) for _ in range(6)])
    top1, top1_lp = Sampler()(logits, [seq(SamplingParams(temperature=0.8, top_k=1, seed=i)) for i in range(6)])
    assert top1 == greedy == logits.argmax(-1).tolist()
    assert top1_lp == [0.0] * 6  # the whole truncated distribution sits on that token
    assert torch.allclose(torch.tensor(greedy_lp), torch.log_softmax(logits, -1).max(-1).values)


def test_seeded_draws_reproducible_independent_of_batch_and_seeds_differ():
    torch.manual_seed(0)
    logits = torch.randn(1, 1000)

    def draw(seed: int, batch_extra: int = 0) -> list[int]:
        s = seq(SamplingParams(temperature=1.0, seed=seed))
        others = [seq(SamplingParams(temperature=1.0)) for _ in range(batch_extra)]
        rows = torch.cat([logits] + [torch.randn(1, 1000) for _ in others])
        return [Sampler()(rows, [s, *others])[0][0] for _ in range(1)] + \
            [Sampler()(logits, [s])[0][0] for _ in range(20)]

    assert draw(7) == draw(7, batch_extra=3)
    assert draw(7) != draw(8)


def test_temperature_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    s = seq(SamplingParams(temperature=1.0, seed=0))
    counts = torch.bincount(torch.tensor([Sampler()(logits, [s])[0][0] for _ in range(3000)]), minlength=3)
    assert torch.allclose(counts / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_greedy_without_log_probs_gives_the_same_tokens():
    """The engine asks for no log-probs when no request in the batch returns them: the C++ greedy kernel then skips
    its exp pass (NaN log-probs), the tokens stay the argmax."""
    logits = torch.randn(4, 1000) * 3
    seqs = [seq(SamplingParams(temperature=0)) for _ in range(4)]
    tokens, log_probs, _ = Sampler().sample(logits, seqs)
    fast_tokens, fast_log_probs, _ = Sampler().sample(logits, seqs, need_log_probs=False)
    assert tokens == fast_tokens == logits.argmax(-1).tolist()
    assert all(lp == lp for lp in log_probs) and all(lp != lp for lp in fast_log_probs)  # NaN != NaN


def test_a_seeded_draw_is_the_same_with_or_without_top_log_probs():
    """Rows that ask for top-N draw as the others do (sample_rows.cpp), so a seeded request's tokens do not depend on
    whether it asked for top-N."""
    torch.manual_seed(1)
    logits = torch.randn(3, 500) * 2

    def draws(top: int) -> list[int]:
        seqs = [seq(SamplingParams(temperature=0.9, top_p=0.9, seed=5 + i, top_log_probs=top)) for i in range(3)]
        return [t for _ in range(10) for t in Sampler().sample(logits, seqs)[0]]

    plain, with_top = draws(0), draws(2)
    assert plain == with_top and len(set(plain)) > 3


def test_top_log_probs_beside_plain_rows():
    """Greedy and sampled rows asking for top-N (top_log_probs.cpp) beside rows that do not: the same tokens as
    without top-N, the top-N against float64's log-softmax of the final logits (after top-k/top-p), and each row's
    token log-prob the very number its top-N list gives that token."""
    torch.manual_seed(3)
    logits = torch.randn(4, 3000) * 3
    kinds = [dict(), dict(temperature=0.8, top_k=40, seed=11), dict(temperature=1.1, top_p=0.5, seed=12), dict()]

    def run(top: int):
        seqs = [seq(SamplingParams(**kind, top_log_probs=top if i < 3 else 0)) for i, kind in enumerate(kinds)]
        return Sampler().sample(logits.clone(), seqs)

    tokens, token_lps, tops = run(4)
    plain_tokens, plain_lps, _ = run(0)
    assert tokens == plain_tokens and token_lps[3] == plain_lps[3] and tops[3] == []
    for row, (kind, top) in enumerate(zip(kinds[:3], tops[:3])):
        final = logits[row].double() / kind.get("temperature", 1.0)
        if "top_k" in kind:
            final[final < final.topk(kind["top_k"]).values[-1]] = float("-inf")
        reference = torch.log_softmax(final, -1)
        values, ids = reference.topk(4)
        finite = [(int(t), v) for v, t in zip(values.tolist(), ids.tolist()) if v != float("-inf")]
        if "top_p" not in kind:  # (top-p's nucleus: sample_rows' own boundary, checked in its kernel tests)
            assert [t for t, _ in top] == [t for t, _ in finite]
            assert max(abs(a - b) for (_, a), (_, b) in zip(top, finite)) < 1e-5
        assert dict(top).get(tokens[row], token_lps[row]) == token_lps[row]
    assert tokens[0] == int(logits[0].argmax()) and tops[0][0][0] == tokens[0]
