"""When a sequence's proposals keep failing, stop paying for them: shorter proposals, then an exponential back-off.

A speculating step feeds `1 + k` tokens instead of 1. At batch 1 on a CPU the extra rows cost little (the step
reads the weights once either way), but a batch's step takes the slower mixed-batch path as soon as one of
its sequences proposes, and every rejected proposal is a row of matrix products for nothing. In free generation
the n-gram proposer finds some earlier match almost every step and is almost always wrong there, which made
speculation slower than plain decoding at batch 4.

So each sequence carries `spec_wait` (steps to sit out) and `spec_miss_streak` (consecutive steps whose
proposals were all rejected). After a step that accepted nothing, the sequence skips the next
`min(2 ** (streak - 1), MAX_WAIT)` steps: 1, 2, 4, ... A step that accepts anything resets the streak, so in
input-grounded text, where proposals are mostly right, a miss costs one skipped step. Skipping changes no
output: a step without proposals is exactly a plain step (runtime/speculative/step.py).

Between the two, the proposal length follows the last outcome: a sequence proposes at most one more token than it
had accepted last time (`spec_len`; k at first). The C++ step's products cost about the same for 1 or 2 rows of a
sequence and ~1.7x for 5 (kernels/cpu/q4_interleaved.cpp), so after a miss one proposal is a cheap probe, and a run
of acceptances grows back to k one token a step.
"""

from __future__ import annotations

from llmengine_runtime.runtime.sequence import Sequence

MAX_WAIT = 16  # steps; one proposal attempt per 17 steps costs little even when it is always wrong


def may_propose(seq: Sequence) -> bool:
    """Whether `seq` proposes this step; a waiting sequence counts one step of its wait down."""
    if seq.spec_wait > 0:
        seq.spec_wait -= 1
        return False
    return True


def proposal_room(seq: Sequence, room: int) -> int:
    """How many tokens `seq` may propose this step, of the `room` the scheduler left: one more than it accepted
    last time it proposed."""
    return min(room, seq.spec_len) if seq.spec_len else room


def record_outcome(seq: Sequence, num_proposed: int, num_accepted: int) -> None:
    """After a speculating step: the next proposal length, and reset on any acceptance, else wait twice as long
    as after the last miss."""
    if num_proposed == 0:
        return
    seq.spec_len = num_accepted + 1
    if num_accepted:
        seq.spec_miss_streak = 0
        return
    seq.spec_miss_streak += 1
    seq.spec_wait = min(2 ** (seq.spec_miss_streak - 1), MAX_WAIT)
