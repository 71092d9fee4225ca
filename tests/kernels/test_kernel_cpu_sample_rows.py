"""Sampling kernels on the CPU (kernels/cpu/sample_rows.cpp): top-k / top-p truncation against the sort-based torch
reference on fresh random rows (peaked and flat, ties, every combination of the two), and the inverse-CDF draw: the
token each uniform selects, the log-probs against log_softmax, the empirical distribution against softmax (chi-square),
no token of probability 0 ever drawn, and a clear error for a row with nothing to draw."""

import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.runtime.sampler import top_k_top_p_torch

ops = torch.ops.llmengine_cpu


@pytest.fixture(autouse=True, scope="module")
def built():
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning logged by kernels.cpu)"


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])  # flat to peaked rows
@pytest.mark.parametrize("vocab", [7, 1000, 49152])
def test_truncation_keeps_the_reference_set(scale, vocab):
    """Top-k alone: the torch reference's set exactly (ties to the lower id). With top-p: a prefix of the same rank
    order whose boundary is where the float64 mass before a token reaches top_p, to 1e-5 (the fp32 probabilities'
    rounding moves it over a long tail of tiny ones; torch's own fp32 softmax and cumsum miss by as much)."""
    gen = torch.Generator().manual_seed(int(scale * 10) + vocab)
    rows = 12
    logits = torch.randn(rows, vocab, generator=gen) * scale
    logits[3, : vocab // 2] = logits[3, 0]  # ties: the lower token id first
    logits[4, 1::3] = float("-inf")  # tokens already dropped
    top_k = torch.tensor([vocab, 1, 2, 5, vocab, 50, vocab, 3, vocab, vocab, 40, vocab])
    top_p = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.9, 0.8, 0.95, 0.3, 0.999, 0.01, 1.0, 0.6])
    got = ops.truncate_logits(logits, top_k, top_p)
    kept = torch.isfinite(got)
    assert torch.equal(got[kept], logits[kept]) and kept.sum(-1).min() >= 1
    want = torch.isfinite(top_k_top_p_torch(logits, top_k, top_p))
    for r in range(rows):
        if top_p[r] == 1:
            assert torch.equal(kept[r], want[r])
            continue
        order = sorted(range(vocab), key=lambda j: (-logits[r, j].item(), j))[:int(top_k[r])]
        n = int(kept[r].sum())
        assert kept[r, order[:n]].all()  # a prefix of the rank order
        probs = torch.softmax(logits[r, order].double(), -1)
        mass_before = torch.cumsum(probs, 0) - probs
        assert n == 1 or mass_before[n - 1] < top_p[r] + 1e-5  # the last kept token was still needed
        assert n == len(order) or mass_before[n] >= top_p[r] - 1e-5  # the first dropped one was not


def test_truncation_rejects_what_it_cannot_do():
    with pytest.raises(RuntimeError, match="top_k >= 1, top_p in"):
        ops.truncate_logits(torch.randn(2, 10), torch.tensor([0, 3]), torch.tensor([1.0, 1.0]))
    with pytest.raises(RuntimeError, match="top_k and top_p must be"):
        ops.truncate_logits(torch.randn(2, 10), torch.tensor([3]), torch.tensor([1.0, 1.0]))


def test_each_uniform_draws_the_first_token_whose_cumulative_mass_exceeds_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).repeat(6, 1)
    u = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.999999], dtype=torch.float64)
    tokens, log_probs = ops.sample_logits(logits, u, True)
    assert tokens.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(log_probs, torch.log(torch.tensor([0.5, 0.5, 0.3, 0.3, 0.2, 0.2])), atol=1e-6)
    _, no_log_probs = ops.sample_logits(logits, u, False)
    assert torch.isnan(no_log_probs).all()


def test_draws_follow_the_softmax_and_log_probs_are_its_logs():
    gen = torch.Generator().manual_seed(3)
    vocab, draws = 10, 20000
    row = torch.randn(vocab, generator=gen) * 1.5
    row[7] = float("-inf")  # probability 0: never drawn
    u = torch.rand(draws, dtype=torch.float64, generator=gen)
    tokens, log_probs = ops.sample_logits(row.repeat(draws, 1), u, True)
    p = torch.softmax(row.double(), -1)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[7] == 0
    support = p > 0
    chi2 = ((counts[support] - draws * p[support]) ** 2 / (draws * p[support])).sum()
    assert chi2 < 33.7  # chi-square, 8 degrees of freedom, alpha = 1e-4
    assert torch.allclose(log_probs.double(), torch.log_softmax(row.double(), -1)[tokens], atol=1e-5)


def test_a_row_with_nothing_to_draw_is_refused_by_name():
    logits = torch.zeros(3, 5)
    logits[1] = float("-inf")
    with pytest.raises(RuntimeError, match="row 1 has no finite logit"):
        ops.sample_logits(logits, torch.zeros(3, dtype=torch.float64), True)
    logits[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="row 1"):
        ops.sample_logits(logits, torch.zeros(3, dtype=torch.float64), True)
