"""The speculation back-off: a sequence proposes one more token than it accepted last time; one whose proposals are
all rejected sits out 1, 2, 4, ... steps (up to MAX_WAIT); any acceptance resets that; and the engine uses both
without changing a single output token."""

from __future__ import annotations

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.detokenizer import TextStream
from llmengine_runtime.runtime.sequence import Sequence
from llmengine_runtime.runtime.speculative.backoff import MAX_WAIT, may_propose, proposal_room, record_outcome
from tests.runtime.spec_helpers import make_engine, run, spec_stats


def sequence() -> Sequence:
    return Sequence("r", [1, 2, 3], SamplingParams(), TextStream(None, [1, 2, 3], [], False, True))


def steps_until_it_proposes(seq: Sequence) -> int:
    skipped = 0
    while not may_propose(seq):
        skipped += 1
    return skipped


def test_misses_double_the_wait_up_to_the_cap_and_a_hit_resets_it():
    seq = sequence()
    assert steps_until_it_proposes(seq) == 0
    waits = []
    for _ in range(8):
        record_outcome(seq, 3, 0)
        waits.append(steps_until_it_proposes(seq))
    assert waits == [1, 2, 4, 8, 16, MAX_WAIT, MAX_WAIT, MAX_WAIT] and MAX_WAIT == 16
    record_outcome(seq, 3, 1)  # one accepted proposal: propose every step again
    assert steps_until_it_proposes(seq) == 0
    record_outcome(seq, 3, 0)
    assert steps_until_it_proposes(seq) == 1
    record_outcome(seq, 0, 0)  # nothing proposed: nothing learnt
    assert seq.spec_miss_streak == 1 and steps_until_it_proposes(seq) == 0


def test_an_engine_whose_proposals_always_miss_stops_proposing_and_its_tokens_are_unchanged(tiny_dir, cache_gib):
    folder = tiny_dir("llama-mha")
    prompt = [7, 8, 9] * 4
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    [want] = run(make_engine(folder, cache_gib), [prompt], params)
    spec = make_engine(folder, cache_gib, speculative="ngram", num_speculative_tokens=4)
    vocab = spec.config.vocab_size

    def wrong_proposals(seqs, max_tokens):  # never the greedy token: every proposal is rejected
        return [[(want.token_ids[len(seq.output_token_ids)] + 1) % vocab] * k for seq, k in zip(seqs, max_tokens)], None

    spec.speculator.proposer.propose_seqs = wrong_proposals
    [got] = run(spec, [prompt], params)
    assert got.token_ids == want.token_ids
    proposed, accepted, spec_steps = spec_stats(spec)
    # 39 decode steps; it proposes on steps 1, 3, 6, 11, 20 and 37 (waits of 1, 2, 4, 8, 16 after the misses):
    # 4 tokens the first time, then one each (one more than the none it accepted)
    assert (accepted, spec_steps, proposed) == (0, 6, 4 + 5 * 1)


def test_proposals_are_one_longer_than_the_last_acceptance():
    seq = sequence()
    assert proposal_room(seq, 4) == 4  # nothing learnt yet: all the room
    record_outcome(seq, 4, 2)
    assert proposal_room(seq, 4) == 3 and proposal_room(seq, 2) == 2  # never past the scheduler's room
    record_outcome(seq, 3, 3)
    assert proposal_room(seq, 4) == 4 and proposal_room(seq, 6) == 4
    record_outcome(seq, 4, 0)
    assert proposal_room(seq, 4) == 1
    record_outcome(seq, 0, 0)  # nothing proposed: nothing learnt
    assert proposal_room(seq, 4) == 1
