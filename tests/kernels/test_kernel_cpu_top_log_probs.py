"""The top-N log-probs kernel (kernels/cpu/top_log_probs.cpp) against float64's log-softmax and topk on fresh random
rows: vocabularies around its 8-logit steps, ties (the lower id first), rows cut to a few finite logits (the rest
-inf: not listed), k past the vocabulary, rows with no distribution, and errors that name the input."""

import pytest
import torch

from llmengine_runtime.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the C++ kernels are not built")
NEG_INF = float("-inf")


def top(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    return torch.ops.llmengine_cpu.top_log_probs(logits, tokens, k)


@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 1000, 49152])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_float64(vocab, k):
    gen = torch.Generator().manual_seed(vocab * 31 + k)
    logits = torch.randn(6, vocab, generator=gen) * 4
    tokens = torch.randint(0, vocab, (6,), generator=gen)
    own, values, ids = top(logits, tokens, k)
    reference = torch.log_softmax(logits.double(), -1)
    kk = min(k, vocab)
    ref_values, ref_ids = reference.topk(kk, -1)
    assert torch.equal(ids[:, :kk], ref_ids)  # random normals: no ties
    torch.testing.assert_close(values[:, :kk].double(), ref_values, rtol=0, atol=1e-5)
    assert (values[:, kk:] == NEG_INF).all() and (ids[:, kk:] == -1).all()
    torch.testing.assert_close(own.double(), reference.gather(1, tokens[:, None]).squeeze(1), rtol=0, atol=1e-5)
    # the chosen token's log-prob is the list's number for it, bit for bit
    for b in range(6):
        listed = dict(zip(ids[b].tolist(), values[b].tolist()))
        assert listed.get(int(tokens[b]), float(own[b])) == float(own[b])


def test_ties_go_to_the_lower_id_and_cut_tokens_are_not_listed():
    logits = torch.full((2, 40), NEG_INF)
    logits[0, [3, 9, 17, 30]] = torch.tensor([1.0, 2.0, 2.0, 2.0])
    logits[1, 20:] = 0.5  # a flat row: ids 20, 21, ... in order
    own, values, ids = top(logits, torch.tensor([3, 39]), 6)
    assert ids[0].tolist() == [9, 17, 30, 3, -1, -1] and (values[0, 4:] == NEG_INF).all()
    assert ids[1].tolist() == [20, 21, 22, 23, 24, 25]
    torch.testing.assert_close(values[1], torch.full((6,), -torch.log(torch.tensor(20.0)).item()))
    assert float(own[0]) == float(values[0, 3])


def test_a_row_without_a_distribution():
    logits = torch.zeros(3, 10)
    logits[0, 4] = float("nan")
    logits[1] = NEG_INF
    own, values, ids = top(logits, torch.tensor([0, 0, 0]), 3)
    assert own[:2].isnan().all() and (values[:2] == NEG_INF).all() and (ids[:2] == -1).all()
    assert not own[2].isnan() and ids[2].tolist() == [0, 1, 2]


def test_bad_inputs_name_what_is_accepted():
    with pytest.raises(RuntimeError, match=r"row 1's token 10 is not in \[0, 10\)"):
        top(torch.zeros(2, 10), torch.tensor([0, 10]), 2)
    with pytest.raises(RuntimeError, match="k >= 1"):
        top(torch.zeros(2, 10), torch.tensor([0, 1]), 0)
    with pytest.raises(RuntimeError, match="one token per row"):
        top(torch.zeros(2, 10), torch.tensor([0]), 2)
