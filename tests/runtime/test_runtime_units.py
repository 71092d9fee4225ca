"""Parameters, block accounting and scheduling without a model."""

from __future__ import annotations

import pytest

from llmengine_runtime.runtime.block_manager import BlockManager
from llmengine_runtime.runtime.detokenizer import TextStream
from llmengine_runtime.runtime.params import SamplingParams
from llmengine_runtime.runtime.scheduler import Scheduler
from llmengine_runtime.runtime.sequence import Sequence, Status


@pytest.mark.parametrize("field,value,accepted", [
    ("max_new_tokens", 0, ">= 1"), ("temperature", -0.1, ">= 0"), ("top_k", 0, "-1 (off) or an integer >= 1"),
    ("top_k", -2, ">= 1"), ("top_p", 0.0, "0 < top_p <= 1"), ("top_p", 1.5, "0 < top_p <= 1"),
    ("presence_penalty", 2.5, "[-2, 2]"), ("frequency_penalty", -3.0, "[-2, 2]"),
])
def test_params_validate_names_field_and_range(field, value, accepted):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value}).validate()
    assert str(info.value).startswith(f"{field}={value!r}") and accepted in str(info.value)


def test_params_defaults_and_bounds_valid():
    SamplingParams().validate()
    SamplingParams(temperature=1.5, top_k=1, top_p=1e-3, presence_penalty=-2, frequency_penalty=2).validate()


def seq(request_id: str, prompt_len: int, max_new_tokens: int = 4) -> Sequence:
    stream = TextStream(None, [], [], False, True)
    return Sequence(request_id, list(range(prompt_len)), SamplingParams(max_new_tokens=max_new_tokens), stream)


def test_block_manager_allocates_appends_and_frees_exactly():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq("a", 5), seq("b", 3)
    bm.allocate(a, 5)
    assert len(a.block_table) == 2 and bm.num_used == 2
    bm.allocate(a, 8)  # still 2 blocks
    assert len(a.block_table) == 2
    bm.allocate(a, 9)  # append a third
    bm.allocate(b, 3)
    assert bm.num_used == 4 and bm.num_free == 4 and not set(a.block_table) & set(b.block_table)
    bm.check([a, b])
    assert not bm.can_allocate(b, 4 * 6) and bm.can_allocate(b, 4 * 5)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(b, 4 * 6)
    bm.free(a)
    assert a.block_table == [] and bm.num_used == 1
    bm.check([b])
    bm.free(b)
    bm.check([])
    assert bm.num_free == 8


def test_block_manager_check_catches_leaks():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", 4)
    bm.allocate(a, 4)
    with pytest.raises(AssertionError):
        bm.check([])  # a holds a block the check was not told about
    a.block_table.clear()  # lost without free: a leak
    with pytest.raises(AssertionError):
        bm.check([])


def run_fake_steps(sched: Scheduler, seqs: list[Sequence], max_steps: int = 1000) -> list[list[tuple[str, int]]]:
    """Drive the scheduler like the engine does, with token 0 as every 'sampled' token."""
    for s in seqs:
        sched.add(s)
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return steps
        batch = sched.schedule()
        assert batch, "scheduler produced an empty step with work pending"
        assert sum(n for _, n in batch) <= sched.max_num_batched_tokens
        assert len(batch) <= sched.max_num_seqs
        steps.append([(s.request_id, n) for s, n in batch])
        for s, n in batch:
            assert len(s.block_table) * sched.block_manager.block_size >= s.num_computed_tokens + n
            s.num_computed_tokens += n
            if s.num_computed_tokens == s.num_tokens:
                s.output_token_ids.append(0)
                if len(s.output_token_ids) == s.params.max_new_tokens:
                    sched.finish(s, "length")
        sched.block_manager.check(sched.running)
    raise AssertionError("did not finish")


def test_scheduler_chunks_long_prompts_and_mixes_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    short, long = seq("short", 3), seq("long", 25)
    steps = run_fake_steps(sched, [short, long])
    assert steps[0] == [("short", 3), ("long", 7)]  # the long prompt starts in the leftover budget
    assert steps[1] == [("short", 1), ("long", 9)]  # decode + next chunk
    assert steps[2] == [("short", 1), ("long", 9)]
    assert steps[3] == [("short", 1), ("long", 1)]  # long's prefill is done: both decode
    assert short.status is Status.FINISHED and long.status is Status.FINISHED


def test_scheduler_preempts_newest_and_recomputes():
    # 6 blocks of 4 = 24 tokens; three sequences of 6 + 8 tokens cannot all stay resident.
    sched = Scheduler(BlockManager(6, 4), max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [seq(f"s{i}", 6, max_new_tokens=8) for i in range(3)]
    steps = run_fake_steps(sched, seqs)
    assert sched.num_preemptions > 0
    assert all(len(s.output_token_ids) == 8 for s in seqs)
    recomputed = [n for step in steps for rid, n in step if n > 6]
    assert recomputed, "a preempted sequence is recomputed from prompt + generated tokens"
    assert sched.block_manager.num_free == 6
