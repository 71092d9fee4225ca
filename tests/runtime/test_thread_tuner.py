"""The engine's CPU thread tuner: it keeps whichever of 1 and the maximum thread count decodes faster, follows a
change of load at its next trial, and changes no token."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.thread_tuner import ThreadTuner, make_thread_tuner
from tests.runtime.spec_helpers import make_engine, run


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def drive(tuner: ThreadTuner, steps: int, seconds_per_step: dict[int, float]) -> list[int]:
    """Run `steps` decode steps whose time depends on the thread count; the thread count of each step."""
    used = []
    for _ in range(steps):
        tuner.before_decode_step()
        used.append(torch.get_num_threads())
        tuner.after_decode_step(seconds_per_step[torch.get_num_threads()] * 4, num_seqs=4)
    return used


def test_keeps_the_faster_count_and_follows_the_load():
    tuner = ThreadTuner(2, explore_every=50, trial_steps=3, first_trial_at=2)
    quiet, busy = {2: 0.010, 1: 0.017}, {2: 0.200, 1: 0.030}
    used = drive(tuner, 8, quiet)
    assert used == [2, 2] + [2, 1] * 3 and tuner.threads == 2  # a trial alternates; 2 threads won
    used = drive(tuner, 60, busy)  # a neighbour arrives: the next trial, 50 steps on, picks 1 thread
    assert used[:50] == [2] * 50 and used[50:56] == [2, 1] * 3 and used[56:] == [1] * 4 and tuner.threads == 1
    drive(tuner, 60, quiet)  # and it leaves: back to 2
    assert tuner.threads == 2 and torch.get_num_threads() == 2


def test_one_thread_has_nothing_to_tune():
    tuner = ThreadTuner(1, explore_every=2, trial_steps=1, first_trial_at=0)
    assert drive(tuner, 5, {1: 0.01}) == [1] * 5


def test_make_thread_tuner():
    cpu = torch.device("cpu")
    assert make_thread_tuner(None, cpu) is None
    assert make_thread_tuner(1, cpu) is None and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert make_thread_tuner("auto", cpu).candidates == [2, 1]
    assert make_thread_tuner("auto", cpu, tensor_parallel_size=2) is None  # workers keep cores / N each
    assert make_thread_tuner("auto", torch.device("meta")) is None
    for bad in (0, "4", 2.5, True):
        with pytest.raises(ValueError, match="cpu_threads"):
            make_thread_tuner(bad, cpu)


@pytest.mark.slow  # an engine decoding with both thread counts
def test_an_engine_tuning_its_threads_gives_the_same_tokens(tiny_dir, cache_gib):
    folder = tiny_dir("llama-mha")
    prompts = [[5, 6, 7, 8] * 3, [20, 21, 22, 23, 24]]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    torch.set_num_threads(2)
    want = run(make_engine(folder, cache_gib), prompts, params)
    engine = make_engine(folder, cache_gib, cpu_threads="auto")
    assert run(engine, prompts, params) == want
    tuner = engine.thread_tuner
    assert tuner.decode_steps == 29 and tuner.next_trial_at > 4  # every decode step counted; a trial ran


def test_the_threads_option():
    import argparse

    from llmengine_runtime.server.serve import add_parallel_args

    parser = argparse.ArgumentParser()
    add_parallel_args(parser)
    assert parser.parse_args([]).threads == "auto"
    assert parser.parse_args(["--threads", "3"]).threads == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--threads", bad])
