"""One request as the scheduler, the block manager and the runner see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from llmengine_runtime.runtime.detokenizer import TextStream
from llmengine_runtime.runtime.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token ids are `prompt_token_ids + output_token_ids`; the first `num_computed_tokens` of them have
    their K/V in the cache (in the blocks of `block_table`). Each step computes some of the rest; once
    all are computed the step samples the next token. Preemption frees the blocks and sets
    `num_computed_tokens` to 0, so the sequence is recomputed from prompt + output later (starting from
    whatever prefix the cache still holds).

    A speculating step feeds the last token and then `draft_token_ids`; afterwards `num_computed_tokens`
    counts the last token and the accepted proposals (which are then outputs), never a rejected one."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    text: TextStream
    deadline: float | None = None  # time.monotonic() after which it finishes with "timeout"
    generator: torch.Generator | None = None  # seeded requests draw from their own generator
    output_token_ids: list[int] = field(default_factory=list)
    output_log_probs: list[float] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_hashed_blocks: int = 0  # leading blocks of block_table the prefix cache has seen (BlockManager)
    # Speculative decoding (runtime/speculative/step.py): this step's proposals, fed after the last token, and the
    # proposer's own per-sequence state (a TokenHistory, the draft model's KV length); preemption drops it.
    draft_token_ids: list[int] = field(default_factory=list)
    proposer_state: Any = None
    spec_wait: int = 0  # steps to sit out before proposing again, and the misses behind it (speculative/backoff.py)
    spec_miss_streak: int = 0
    spec_len: int = 0  # the most it proposes next (0: k); speculative/backoff.py `proposal_room`
    # Guided decoding: the request's runtime.guided.GuidedMatcher (None: unconstrained); it has consumed every
    # output token, so after preemption it is already where the recomputed sequence resumes.
    matcher: Any = None
    # Prompt scoring (params.prompt_log_probs): entry i is prompt token i + 1's log-prob given those before it
    # (and its rank and top-N), accumulated chunk by chunk (model_runner.py); sent once, in the first output.
    prompt_log_probs: list[float] = field(default_factory=list)
    prompt_ranks: list[int] = field(default_factory=list)
    prompt_top_log_probs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_log_probs_sent: bool = False
    # vLLM's extra logits processing (runtime/logits_processors.py), built in make_sequence; None: none asked
    processing: Any = None
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache held when it was first admitted
    status: Status = Status.WAITING
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids[start:] + self.output_token_ids[max(0, start - n):end - n])

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
