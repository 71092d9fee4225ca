"""What the engine gives back for a request: one `RequestOutput` per step that changed it (a delta), or one merged
output for a request that does not stream (runtime/async_engine.py)."""

from __future__ import annotations

from dataclasses import dataclass

from llmengine_runtime.runtime.log_probs import TopLogProbs

FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")


@dataclass
class RequestOutput:
    """One delta of one request's output; the last one has finished=True."""

    request_id: str
    text: str  # new text since the previous delta ("" while text is held back)
    token_ids: list[int]  # tokens generated since the previous delta
    log_probs: list[float] | None  # one per token in token_ids, when requested
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "timeout" | "error"
    num_prompt_tokens: int
    num_completion_tokens: int  # total so far
    error: str | None = None
    top_log_probs: list[TopLogProbs] | None = None  # with params.top_log_probs: one list per token in token_ids
    # With params.prompt_log_probs, in the first output only: one per prompt token (the first None)
    prompt_log_probs: list[float | None] | None = None
    prompt_top_log_probs: list[TopLogProbs | None] | None = None  # params.prompt_top_n of each (None when 0)
    prompt_ranks: list[int | None] | None = None  # each prompt token's rank: 1 + the tokens more likely than it
    prompt_token_ids: list[int] | None = None  # beside prompt_log_probs: the tokens they score
    # On the one output of a stream=False request (runtime/async_engine.py): when its first token was ready
    # (time.perf_counter), so the server can still report time to first token
    first_token_time: float | None = None
    # ... and each of its tokens' text as its own delta would have credited it (the delta's text on its last token)
    token_texts: list[str] | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop_token_ids token or the stop string that ended it
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held (vLLM's usage.prompt_tokens_details)
