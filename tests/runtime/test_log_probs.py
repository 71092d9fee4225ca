"""Top-N log-probs and prompt log-probs (scoring) in the runtime, on a tiny random Llama."""

from __future__ import annotations

import random

import pytest
import torch

from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.engine import Engine
from llmengine_runtime.runtime.log_probs import top_log_probs
from llmengine_runtime.runtime.sampler import Sampler, final_logits
from tests.runtime.test_runtime_sampler import seq as make_seq

BS = 4


@pytest.fixture(scope="module")
def folder(tiny_dir):
    return tiny_dir("llama-mha")


def engine(folder, cache_gib, **kwargs) -> Engine:
    return Engine(folder, device="cpu", block_size=BS, kv_cache_gib=cache_gib(folder, 64, BS), **kwargs)


def run_all(eng: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list]:
    """Every output of each request, in order; checks the block accounting after each step."""
    outs: dict[str, list] = {}
    for i, (prompt, params) in enumerate(requests):
        eng.add_request(prompt, params, request_id=str(i))
    while eng.has_unfinished():
        for out in eng.step():
            outs.setdefault(out.request_id, []).append(out)
        eng.block_manager.check(list(eng.requests.values()))
    return [outs[str(i)] for i in range(len(requests))]


def direct_log_softmax(eng: Engine, prompt: list[int]) -> torch.Tensor:
    """The model's log-softmax at every prompt position, one cache-less forward."""
    ids = torch.tensor(prompt)
    with torch.inference_mode():
        hidden = eng.model(ids, torch.arange(len(prompt)), AttentionMetadata.for_prompts([len(prompt)]))
        return torch.log_softmax(eng.model.compute_logits(hidden).float(), dim=-1)


@pytest.mark.parametrize("params", [SamplingParams(top_log_probs=5),
                                    SamplingParams(temperature=0.7, top_k=4, top_p=0.9, top_log_probs=6, seed=1),
                                    SamplingParams(temperature=1.2, presence_penalty=0.5, top_log_probs=3, seed=2)])
def test_sampler_top_n_is_topk_of_its_distribution(params):
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seqs = [make_seq(params, output=[1, 2]), make_seq(SamplingParams(), output=[3]), make_seq(params, output=[4])]
    tokens, log_probs, tops = Sampler().sample(logits.clone(), seqs)
    expected = torch.log_softmax(final_logits(logits, [s.params for s in seqs], [s.output_token_ids for s in seqs]),
                                 dim=-1)
    assert tops[1] == []  # top_log_probs 0
    for row in (0, 2):
        values, ids = expected[row].topk(params.top_log_probs)
        want = [(int(t), float(v)) for v, t in zip(values, ids) if v != float("-inf")]
        assert [t for t, _ in tops[row]] == [t for t, _ in want]
        assert [v for _, v in tops[row]] == pytest.approx([v for _, v in want], abs=1e-6)
        assert log_probs[row] == pytest.approx(float(expected[row, tokens[row]]), abs=1e-6)
        if params.greedy:  # the chosen token is the top one
            assert tops[row][0][0] == tokens[row]
        else:
            assert tokens[row] in [t for t, _ in tops[row]] or log_probs[row] <= tops[row][-1][1]
    if params.top_k == 4:  # -inf entries (cut by top-k) are left out
        assert all(len(tops[row]) == 4 for row in (0, 2))


def test_top_log_probs_rows_and_bounds():
    lp = torch.log_softmax(torch.randn(4, 30), dim=-1)
    tops = top_log_probs(lp, [0, 2, 0, 30])
    assert tops[0] == [] and tops[2] == [] and len(tops[1]) == 2 and len(tops[3]) == 30
    with pytest.raises(ValueError, match="top_log_probs=21"):
        SamplingParams(top_log_probs=21).validate()
    with pytest.raises(ValueError, match="max_new_tokens=0.*prompt_log_probs=True"):
        SamplingParams(max_new_tokens=0).validate()
    SamplingParams(max_new_tokens=0, prompt_log_probs=True).validate()


def test_engine_top_n_greedy_and_sampled(folder, cache_gib):
    eng = engine(folder, cache_gib)
    prompt = [5, 9, 11, 3, 7, 40, 2]
    greedy, sampled, plain = run_all(eng, [
        (prompt, SamplingParams(max_new_tokens=6, top_log_probs=4, return_token_log_probs=True, ignore_eos=True)),
        (prompt, SamplingParams(max_new_tokens=6, temperature=0.8, top_k=10, top_log_probs=20, seed=3,
                                return_token_log_probs=True, ignore_eos=True)),
        (prompt, SamplingParams(max_new_tokens=3, ignore_eos=True))])
    assert all(out.top_log_probs is None for out in plain)
    for outs, n in ((greedy, 4), (sampled, 10)):
        tokens = [t for out in outs for t in out.token_ids]
        tops = [top for out in outs for top in out.top_log_probs]
        lps = [lp for out in outs for lp in out.log_probs]
        assert len(tokens) == len(tops) == 6
        assert all(len(top) == n for top in tops)
        for token, lp, top in zip(tokens, lps, tops):
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            assert dict(top).get(token, lp) == pytest.approx(lp, abs=1e-6)
    # greedy: the chosen token is the top one, and the top-N are the model's own log-softmax
    full = prompt + [t for out in greedy for t in out.token_ids]
    direct = direct_log_softmax(eng, full)
    for j, top in enumerate(t for out in greedy for t in out.top_log_probs):
        values, ids = direct[len(prompt) - 1 + j].topk(4)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)


def test_prompt_log_probs_chunked_equal_one_shot_and_direct(folder, cache_gib):
    rng = random.Random(0)
    prompt = [rng.randrange(3, 128) for _ in range(37)]
    params = SamplingParams(max_new_tokens=2, prompt_log_probs=True, top_log_probs=3, ignore_eos=True)
    results = []
    for budget in (2048, 5):  # one shot, then chunks of 5 tokens over 8 steps
        outs = run_all(engine(folder, cache_gib, max_num_batched_tokens=budget), [(prompt, params)])[0]
        assert outs[0].prompt_log_probs is not None
        assert all(out.prompt_log_probs is None for out in outs[1:])  # sent once
        results.append((outs[0].prompt_log_probs, outs[0].prompt_top_log_probs))
    (one, one_top), (chunked, chunked_top) = results
    assert len(one) == len(prompt) and one[0] is None and one_top[0] is None
    assert chunked == pytest.approx(one, abs=1e-5)
    assert [[t for t, _ in top] for top in chunked_top[1:]] == [[t for t, _ in top] for top in one_top[1:]]
    direct = direct_log_softmax(engine(folder, cache_gib), prompt)
    want = [float(direct[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    assert one[1:] == pytest.approx(want, abs=1e-4)
    for i in range(1, len(prompt)):
        assert [t for t, _ in one_top[i]] == direct[i - 1].topk(3).indices.tolist()


def test_score_only_max_new_tokens_zero(folder, cache_gib):
    eng = engine(folder, cache_gib, max_num_batched_tokens=6)
    prompt = list(range(3, 20))
    score, single, gen = run_all(eng, [
        (prompt, SamplingParams(max_new_tokens=0, prompt_log_probs=True, return_token_log_probs=True)),
        ([7], SamplingParams(max_new_tokens=0, prompt_log_probs=True)),
        (prompt, SamplingParams(max_new_tokens=3, prompt_log_probs=True, ignore_eos=True))])
    assert len(score) == 1 and score[0].finished and score[0].finish_reason == "length"
    assert score[0].token_ids == [] and score[0].num_completion_tokens == 0 and score[0].log_probs == []
    assert len(score[0].prompt_log_probs) == len(prompt) and score[0].prompt_top_log_probs is None
    assert score[0].prompt_log_probs[1:] == pytest.approx(gen[0].prompt_log_probs[1:], abs=1e-5)
    assert single[0].prompt_log_probs == [None] and single[0].finish_reason == "length"
    assert sum(len(out.token_ids) for out in gen) == 3
    assert eng.block_manager.num_used == 0 and eng.stats()["finished_length"] == 3


def test_prompt_log_probs_skip_the_prefix_cache_which_still_serves_others(folder, cache_gib):
    eng = engine(folder, cache_gib, enable_prefix_caching=True)
    prompt = list(range(3, 3 + 6 * BS + 1))
    plain = SamplingParams(max_new_tokens=2, ignore_eos=True)
    scored = SamplingParams(max_new_tokens=2, prompt_log_probs=True, ignore_eos=True)
    first = run_all(eng, [(prompt, plain)])[0]
    computed = eng.stats()["tokens_computed"]
    scored_outs = run_all(eng, [(prompt, scored)])[0]
    assert eng.stats()["tokens_computed"] - computed >= len(prompt)  # every prompt position computed again
    assert eng.stats()["prefix_cache_hits"] == 0
    assert len(scored_outs[0].prompt_log_probs) == len(prompt)
    again = run_all(eng, [(prompt, plain)])[0]
    assert eng.stats()["prefix_cache_hits"] == 6 * BS  # the cache serves plain requests
    assert [t for o in again for t in o.token_ids] == [t for o in first for t in o.token_ids] \
        == [t for o in scored_outs for t in o.token_ids]


def test_no_speculation_for_log_prob_requests(folder, cache_gib):
    eng = engine(folder, cache_gib, speculative="ngram", num_speculative_tokens=3)
    prompt = [5, 6, 7, 8] * 6
    params = SamplingParams(max_new_tokens=8, top_log_probs=2, ignore_eos=True)
    outs = run_all(eng, [(prompt, params), (prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))])
    tops = [top for out in outs[0] for top in out.top_log_probs]
    assert len(tops) == 8 and all(len(top) == 2 for top in tops)
    assert [t for o in outs[0] for t in o.token_ids] == [t for o in outs[1] for t in o.token_ids]
    assert eng.stats()["spec_steps"] > 0  # the other request did speculate
    assert all(len(out.token_ids) <= 1 for out in outs[0])  # one token per step: it never speculated

