"""Draft-model speculation on tiny random checkpoints: the target as its own draft accepts every greedy proposal on
every variant; another tiny model of the same vocabulary as draft changes no greedy token; its cache follows the
target's through preemption and prefix caching; a draft of another vocabulary is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.speculative.draft import DraftState, check_same_vocab
from tests.fast import fast_subset
from tests.models.tiny import LLAMA_BASE, VARIANTS
from tests.runtime.spec_helpers import PATTERN_PROMPTS, make_engine, record_verifications, run, spec_stats


@pytest.mark.parametrize("variant", fast_subset(VARIANTS, ["llama-gqa-tied-bias"]))
def test_the_target_as_its_own_draft_accepts_every_greedy_proposal(tiny_dir, cache_gib, variant):
    folder = tiny_dir(variant)
    plain = make_engine(folder, cache_gib)
    spec = make_engine(folder, cache_gib, speculative=str(folder))
    assert spec.speculator.proposer.runner.model is spec.model  # one copy of the weights
    max_new = min(24, plain.max_model_len - max(map(len, PATTERN_PROMPTS)))
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, return_token_log_probs=True)
    want = run(plain, PATTERN_PROMPTS, params)
    got = run(spec, PATTERN_PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.log_probs for r in got] == [pytest.approx(r.log_probs, abs=1e-4) for r in want]
    proposed, accepted, steps = spec_stats(spec)
    assert accepted == proposed > 0 and steps > 0


PAIRS = [("llama-gqa-tied-bias", "llama-mha"), ("falcon-rw-like", "llama3-rope")]


@pytest.mark.parametrize("target, draft", fast_subset(PAIRS, PAIRS[:1]))
def test_another_draft_model_changes_no_greedy_token(tiny_dir, cache_gib, target, draft):
    folder = tiny_dir(target)
    long_prompt = [(7 * i) % 100 + 3 for i in range(30)]
    prompts = PATTERN_PROMPTS + [long_prompt]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, return_token_log_probs=True)
    want = run(make_engine(folder, cache_gib, max_num_batched_tokens=16), prompts, params, steps_between=2)
    spec = make_engine(folder, cache_gib, max_num_batched_tokens=16, speculative=str(tiny_dir(draft)))
    assert spec.speculator.proposer.runner.model is not spec.model
    got = run(spec, prompts, params, steps_between=2)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.log_probs for r in got] == [pytest.approx(r.log_probs, abs=1e-4) for r in want]
    assert spec_stats(spec)[0] > 0


def test_the_draft_cache_follows_the_target_through_preemption_and_prefix_caching(tiny_dir, cache_gib, monkeypatch):
    folder = tiny_dir("llama-mha")
    shared = [9, 8, 7, 6, 5, 4, 3, 2]  # two full blocks every prompt shares
    prompts = [shared + p + [i + 3] for i in range(3) for p in PATTERN_PROMPTS]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    kwargs = dict(num_blocks=16, max_num_seqs=9, max_num_batched_tokens=48)
    want = run(make_engine(folder, cache_gib, enable_prefix_caching=False, **kwargs), prompts, params, steps_between=1)
    spec = make_engine(folder, cache_gib, speculative=str(folder), **kwargs)
    steps = record_verifications(spec, monkeypatch)
    got = run(spec, prompts, params, steps_between=1)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    stats = spec.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0 and steps
    # A draft that read stale K/V (another sequence's, or its own from before a preemption) would propose
    # differently from the target somewhere; with valid K/V the target as its own draft agrees every time.
    assert stats["spec_accepted_tokens"] == stats["spec_proposed_tokens"] > 0


def test_a_changed_block_cuts_the_draft_valid_length(tiny_dir, cache_gib):
    folder = tiny_dir("llama-mha")
    spec = make_engine(folder, cache_gib, speculative=str(folder))
    proposer = spec.speculator.proposer
    seq = spec.make_sequence(list(range(3, 20)), SamplingParams())
    seq.block_table, seq.num_computed_tokens = [5, 6, 7, 8, 9], 17
    seq.proposer_state = DraftState(num_computed=15, blocks=[5, 6, 7, 8])
    assert proposer.valid_length(seq) == 15
    seq.block_table[1] = 11  # the prefix cache swapped in an equal block: its draft K/V is unknown
    assert proposer.valid_length(seq) == 4 and seq.proposer_state.num_computed == 4
    seq.num_computed_tokens = 2  # never past the target's length
    assert proposer.valid_length(seq) == 2


def test_sampled_requests_with_a_draft_model(tiny_dir, cache_gib):
    folder = tiny_dir("llama-mha")
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    draft = str(tiny_dir("llama-gqa-tied-bias"))
    first = run(make_engine(folder, cache_gib, speculative=draft), PATTERN_PROMPTS, params)
    again = run(make_engine(folder, cache_gib, speculative=draft), PATTERN_PROMPTS, params)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert all(len(r.token_ids) == 24 for r in first)
    spec = make_engine(folder, cache_gib, speculative=str(folder))
    run(spec, PATTERN_PROMPTS, params)
    proposed, accepted, _ = spec_stats(spec)
    assert 0 < accepted <= proposed  # the target as draft at the same temperature: p = q, accepted nearly always
    assert accepted >= 0.9 * proposed


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, tiny_dir, cache_gib):
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(LLAMA_BASE, vocab_size=96)))
    model.save_pretrained(tmp_path / "draft96", safe_serialization=True)
    with pytest.raises(ValueError, match=r"vocabulary of 96 tokens, the target 128"):
        make_engine(tiny_dir("llama-mha"), cache_gib, speculative=str(tmp_path / "draft96"))


def test_tokenizers_must_map_ids_to_the_same_tokens(tmp_path):
    config = SimpleNamespace(vocab_size=1000)

    def tokenizer(shift: int):
        return SimpleNamespace(vocab_size=1000, id_to_token=lambda i: f"t{i + shift if i > 500 else i}")

    check_same_vocab(config, config, tokenizer(0), tokenizer(0), tmp_path)
    check_same_vocab(config, config, tokenizer(0), None, tmp_path)  # one has no tokenizer: sizes only
    with pytest.raises(ValueError, match="different tokenizer"):
        check_same_vocab(config, config, tokenizer(0), tokenizer(1), tmp_path)
