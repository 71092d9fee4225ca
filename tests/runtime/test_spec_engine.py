"""Speculative decoding in the engine (n-gram proposals) on tiny random checkpoints: greedy tokens and log-probs
equal plain decoding's on every model variant, with continuous batching, chunked prefill, preemption, aborts,
stop tokens in the middle of an accepted run, max_new_tokens, penalties, opt-outs and a KV cache without room."""

from __future__ import annotations

import itertools

import pytest

from llmengine_runtime.runtime import SamplingParams
from tests.fast import fast_subset
from tests.models.tiny import VARIANTS
from tests.runtime.spec_helpers import PATTERN_PROMPTS, make_engine, record_verifications, run, spec_stats


@pytest.fixture(scope="module")
def folder(tiny_dir):
    return tiny_dir("llama-mha")


def max_new(engine, prompts, want: int = 24) -> int:
    return min(want, engine.max_model_len - max(map(len, prompts)))


@pytest.mark.parametrize("variant", fast_subset(VARIANTS, ["falcon-rw-like"]))
def test_greedy_tokens_and_log_probs_equal_plain_decoding(tiny_dir, cache_gib, variant):
    folder = tiny_dir(variant)
    plain = make_engine(folder, cache_gib)
    spec = make_engine(folder, cache_gib, speculative="ngram")
    params = SamplingParams(max_new_tokens=max_new(plain, PATTERN_PROMPTS), ignore_eos=True,
                            return_token_log_probs=True)
    want = run(plain, PATTERN_PROMPTS, params)
    got = run(spec, PATTERN_PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for g, w in zip(got, want):
        assert len(g.token_ids) == params.max_new_tokens and g.finish_reason == "length"
        assert g.log_probs == pytest.approx(w.log_probs, abs=1e-4)
    proposed, accepted, steps = spec_stats(spec)
    assert proposed > 0 and accepted > 0 and steps > 0
    assert spec_stats(plain) == (0, 0, 0)


def test_mixed_steps_chunked_prefill_and_an_opt_out_change_nothing(folder, cache_gib):
    # Speculating sequences, a plain one (speculate=False) and a long prompt prefilled in chunks, in one batch.
    long_prompt = [(7 * i) % 100 + 3 for i in range(40)]
    prompts = PATTERN_PROMPTS + [long_prompt, PATTERN_PROMPTS[0]]
    params = [SamplingParams(max_new_tokens=20, ignore_eos=True, return_token_log_probs=True)] * 4 + \
        [SamplingParams(max_new_tokens=20, ignore_eos=True, return_token_log_probs=True, speculate=False)]
    want = run(make_engine(folder, cache_gib, max_num_batched_tokens=16), prompts, params, steps_between=2)
    spec = make_engine(folder, cache_gib, max_num_batched_tokens=16, speculative="ngram")
    steps = record_verifications(spec, pytest.MonkeyPatch())
    got = run(spec, prompts, params, steps_between=2)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for g, w in zip(got, want):
        assert g.log_probs == pytest.approx(w.log_probs, abs=1e-4)
    assert all("r4" not in step for step in steps)  # the opt-out never speculated
    assert any(len(step) >= 2 for step in steps)  # several speculating sequences in one step
    assert any(r.deltas < len(r.token_ids) for r in got)  # some deltas carried several tokens


def test_greedy_without_log_probs_beside_a_processed_request(folder, cache_gib):
    # Greedy rows verified from their argmax alone (no log-probs asked), in the steps of a request whose logits are
    # processed (logit_bias: it does not speculate, and its row must not be taken from the raw argmax).
    plain_params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    biased = SamplingParams(max_new_tokens=20, ignore_eos=True, logit_bias={9: 100.0})
    params = [plain_params, plain_params, biased]
    want = run(make_engine(folder, cache_gib), PATTERN_PROMPTS, params)
    spec = make_engine(folder, cache_gib, speculative="ngram")
    steps = record_verifications(spec, pytest.MonkeyPatch())
    got = run(spec, PATTERN_PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got[2].token_ids == [9] * 20
    assert steps and all("r2" not in step for step in steps)  # (r2 runs from first step to last)
    assert any(r.deltas < len(r.token_ids) for r in got[:2])


def test_penalties_apply_to_each_row_with_the_proposals_before_it(folder, cache_gib):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, frequency_penalty=0.4, presence_penalty=0.3,
                            return_token_log_probs=True)
    want = run(make_engine(folder, cache_gib), PATTERN_PROMPTS, params)
    # Penalties break the patterns n-gram proposals live on; the target as its own draft still proposes (with
    # the same penalties), and a row penalised without the proposals before it would reject some.
    spec = make_engine(folder, cache_gib, speculative=str(folder))
    got = run(spec, PATTERN_PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.log_probs for r in got] == [pytest.approx(r.log_probs, abs=1e-4) for r in want]
    proposed, accepted, _ = spec_stats(spec)
    assert accepted == proposed > 0


@pytest.mark.parametrize("max_new_tokens", fast_subset([1, 2, 3, 7, 13], [1, 7]))
def test_max_new_tokens_exactly(folder, cache_gib, max_new_tokens):
    # The target as its own draft: every sequence with room proposes, and every proposal is accepted.
    spec = make_engine(folder, cache_gib, speculative=str(folder), num_speculative_tokens=5)
    got = run(spec, PATTERN_PROMPTS, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
    assert [len(r.token_ids) for r in got] == [max_new_tokens] * len(PATTERN_PROMPTS)
    assert all(r.finish_reason == "length" for r in got)
    proposed, accepted, _ = spec_stats(spec)
    assert (proposed > 0) == (max_new_tokens > 2)  # room only while two tokens or more are left
    assert accepted == proposed


def test_a_stop_token_in_the_middle_of_an_accepted_run_ends_the_request_there(folder, cache_gib, monkeypatch):
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    [free_run] = run(make_engine(folder, cache_gib, speculative=str(folder)), [PATTERN_PROMPTS[0]], params)
    # The target as its own draft accepts every proposal: after the first token, steps emit 5 tokens. A token
    # first seen inside such a run (not at its start) stops it in the middle.
    first_seen = {}
    for i, token in enumerate(free_run.token_ids):
        first_seen.setdefault(token, i)
    stop, index = next((t, i) for t, i in sorted(first_seen.items(), key=lambda x: x[1]) if i % 5 not in (0, 1))
    params = SamplingParams(max_new_tokens=30, return_token_log_probs=True)
    plain = make_engine(folder, cache_gib)
    spec = make_engine(folder, cache_gib, speculative=str(folder))
    plain.stop_token_ids = spec.stop_token_ids = {stop}
    steps = record_verifications(spec, monkeypatch)
    [want] = run(plain, [PATTERN_PROMPTS[0]], params)
    [got] = run(spec, [PATTERN_PROMPTS[0]], params)
    assert got.token_ids == want.token_ids == free_run.token_ids[:index + 1]
    assert got.finish_reason == want.finish_reason == "stop"
    assert got.log_probs == pytest.approx(want.log_probs, abs=1e-4)
    last = steps[-1]["r0"]
    assert stop in last[:-1]  # verification emitted tokens after the stop token; they were dropped


def test_preemption_under_a_tiny_cache_keeps_tokens_and_blocks_exact(folder, cache_gib):
    prompts = [p + [i + 3] for i in range(4) for p in PATTERN_PROMPTS]  # 12 requests, 12-14 tokens each
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, return_token_log_probs=True)
    kwargs = dict(num_blocks=24, max_num_seqs=12, max_num_batched_tokens=32)
    plain = make_engine(folder, cache_gib, **kwargs)
    want = run(plain, prompts, params, steps_between=1)
    for prefix_caching in (False, True):
        spec = make_engine(folder, cache_gib, speculative="ngram", enable_prefix_caching=prefix_caching, **kwargs)
        got = run(spec, prompts, params, steps_between=1)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.log_probs for r in got] == [pytest.approx(r.log_probs, abs=1e-4) for r in want]
        assert spec.stats()["num_preemptions"] > 0 and spec_stats(spec)[1] > 0


def test_abort_mid_run_returns_every_block(folder, cache_gib):
    spec = make_engine(folder, cache_gib, speculative=str(folder))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    seqs = [spec.add_request(p, params) for p in PATTERN_PROMPTS]
    for _ in range(4):
        spec.step()
        spec.block_manager.check(list(spec.requests.values()))
    assert spec_stats(spec)[0] > 0
    out = spec.abort(seqs[1].request_id)
    assert out.finished and out.finish_reason == "abort"
    spec.block_manager.check(list(spec.requests.values()))
    while spec.has_unfinished():
        spec.step()
        spec.block_manager.check(list(spec.requests.values()))
    assert spec.block_manager.num_used == 0 and len(seqs[0].output_token_ids) == 40


def test_no_room_for_proposals_falls_back_to_plain_decoding(folder, cache_gib):
    prompt = [(5 * i) % 90 + 3 for i in range(15)]  # 15 tokens: after the first token its 4 blocks are full
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    [want] = run(make_engine(folder, cache_gib), [prompt], params)
    spec = make_engine(folder, cache_gib, num_blocks=8, speculative=str(folder))  # always proposes, given room
    bm = spec.block_manager
    seq = spec.add_request(prompt, params)
    spec.step()
    hog = spec.make_sequence([3], params, "hog")  # takes every free block: no room for a single proposal
    bm.allocate(hog, bm.num_free * bm.block_size)
    spec.step()
    bm.check([seq, hog])
    assert spec_stats(spec) == (0, 0, 0) and len(seq.output_token_ids) == 2
    assert spec.stats()["num_preemptions"] == 0
    bm.free(hog)
    spec.step()  # room again: it speculates
    assert spec_stats(spec)[2] == 1 and len(seq.output_token_ids) > 3
    while spec.has_unfinished():
        spec.step()
        bm.check(list(spec.requests.values()))
    assert seq.output_token_ids == want.token_ids and bm.num_used == 0


def test_speculate_must_be_a_bool(folder, cache_gib):
    with pytest.raises(ValueError, match="speculate"):
        SamplingParams(speculate="yes").validate()
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        make_engine(folder, cache_gib, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        make_engine(folder, cache_gib, speculative="ngram", prompt_lookup_min=3, prompt_lookup_max=2)


def test_seeded_sampling_with_speculation_is_reproducible(folder, cache_gib):
    params = SamplingParams(max_new_tokens=24, temperature=0.8, top_k=20, seed=7, ignore_eos=True)
    first = run(make_engine(folder, cache_gib, speculative="ngram"), PATTERN_PROMPTS[:1], params)
    again = run(make_engine(folder, cache_gib, speculative="ngram"), PATTERN_PROMPTS[:1], params)
    assert first[0].token_ids == again[0].token_ids and len(first[0].token_ids) == 24


def test_the_async_engine_streams_several_tokens_per_delta(folder, cache_gib):
    import asyncio

    from llmengine_runtime.runtime import AsyncEngine

    params = SamplingParams(max_new_tokens=20, ignore_eos=True, return_token_log_probs=True)
    [want] = run(make_engine(folder, cache_gib), [PATTERN_PROMPTS[0]], params)
    engine = AsyncEngine(folder, device="cpu", block_size=4, kv_cache_gib=cache_gib(folder, 64, 4),
                         speculative=str(folder))

    async def main():
        return [out async for out in engine.add_request(PATTERN_PROMPTS[0], params)]

    try:
        deltas = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    assert [lp for d in deltas for lp in d.log_probs] == pytest.approx(want.log_probs, abs=1e-4)
    assert max(len(d.token_ids) for d in deltas) == 5 and len(deltas) < 20  # the prefill's token, then runs of 5
    assert [d.num_completion_tokens for d in deltas] == list(itertools.accumulate(len(d.token_ids) for d in deltas))
    assert deltas[-1].finished and engine.stats()["spec_accepted_tokens"] > 0
