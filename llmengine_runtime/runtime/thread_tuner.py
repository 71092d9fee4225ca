"""How many torch CPU threads the engine's steps use, chosen by timing its own decode steps.

On an idle 2-core machine, 2 threads decode about 1.7x faster than 1. When another process keeps a core busy,
OpenMP's threads wait for each other at every parallel region (libgomp spins, then sleeps), and 2 threads fell to
1-2 tok/s where 1 thread kept 8-16 (benchmarks/RESULTS.md). No fixed setting is right in both cases: passive
waiting fixes the busy case but halves the idle speed. So the engine measures: every `explore_every` decode
steps it runs `trial_steps` decode steps with each candidate, alternating so that a change in load or batch hits
both alike, and keeps the one with the lower median time per sequence. The candidates are 1 and the maximum; the
first trial starts after `first_trial_at` decode steps (the warm-up's own steps are slow either way).

Only steps where every sequence decodes one token count (prefill chunks cost per token too differently); a
server without traffic never explores.
"""

from __future__ import annotations

import logging
import statistics

import torch

logger = logging.getLogger("runtime")


class ThreadTuner:
    def __init__(self, max_threads: int, explore_every: int = 256, trial_steps: int = 6, first_trial_at: int = 4):
        if max_threads < 1:
            raise ValueError(f"max_threads={max_threads}: accepted an integer >= 1")
        self.candidates = [max_threads, 1] if max_threads > 1 else [1]
        self.explore_every, self.trial_steps = explore_every, trial_steps
        self.threads = max_threads
        self.plan: list[int] = []  # thread counts of the trial steps still to run
        self.samples: dict[int, list[float]] = {}
        self.decode_steps = 0
        self.next_trial_at = first_trial_at
        torch.set_num_threads(self.threads)

    def before_decode_step(self) -> None:
        """Set the thread count for the decode step about to run."""
        if len(self.candidates) == 1:
            return
        if not self.plan and self.decode_steps >= self.next_trial_at:
            self.next_trial_at = self.decode_steps + 2 * self.trial_steps + self.explore_every
            self.plan = [n for _ in range(self.trial_steps) for n in self.candidates]
            self.samples = {n: [] for n in self.candidates}
        want = self.plan[0] if self.plan else self.threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def after_decode_step(self, seconds: float, num_seqs: int) -> None:
        """Record the step's time; at the end of a trial keep the faster thread count."""
        self.decode_steps += 1
        if not self.plan:
            return
        self.samples[self.plan.pop(0)].append(seconds / max(num_seqs, 1))
        if self.plan:
            return
        medians = {n: statistics.median(times) for n, times in self.samples.items()}
        best = min(medians, key=medians.get)
        if best != self.threads:
            logger.info("torch threads %d -> %d (median ms per sequence-step: %s)", self.threads, best,
                        ", ".join(f"{n} threads {1e3 * t:.1f}" for n, t in medians.items()))
        self.threads = best
        torch.set_num_threads(best)


def make_thread_tuner(cpu_threads: int | str | None, device: torch.device,
                      tensor_parallel_size: int = 1) -> ThreadTuner | None:
    """`cpu_threads`: None leaves torch's setting; N sets N threads; "auto" tunes between 1 and torch's current
    count (CPU, one rank: tensor-parallel workers keep cores / N each)."""
    if cpu_threads is None or device.type != "cpu":
        return None
    if cpu_threads == "auto":
        return ThreadTuner(torch.get_num_threads()) if tensor_parallel_size == 1 else None
    if not isinstance(cpu_threads, int) or isinstance(cpu_threads, bool) or cpu_threads < 1:
        raise ValueError(f"cpu_threads={cpu_threads!r}: accepted an integer >= 1, 'auto' or None")
    torch.set_num_threads(cpu_threads)
    return None
