"""Whether a request ends at the token just appended to it, and why: the engine's stop decision for one token.

A request ends with finish reason "stop" at a stop token (the model's own, unless `ignore_eos`, or one of its
`stop_token_ids`), a stop string, or a guided constraint that allows nothing more; with "length" at
`max_new_tokens`. Before `min_tokens` tokens neither stop tokens (the sampler masks them too) nor stop strings end
it. `stop_reason` is vLLM's: the stop token id of `stop_token_ids` or the stop string that ended it, else None.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmengine_runtime.runtime.sequence import Sequence


@dataclass
class TokenEnd:
    text: str  # the text this token adds (held-back text flushed when the request ends)
    reason: str | None  # "stop" | "length" | None: the request goes on
    stop_reason: int | str | None = None


def after_token(seq: Sequence, token: int, model_stop_ids: set[int]) -> TokenEnd:
    """The text `token` (already appended to seq.output_token_ids and fed to its matcher) adds, and whether the
    request ends there."""
    p = seq.params
    may_stop = len(seq.output_token_ids) >= p.min_tokens
    own_stop = token in p.stop_token_ids
    if may_stop and (own_stop or (token in model_stop_ids and not p.ignore_eos)):
        # The stop token's own text only with include_stop_str_in_output (and specials not skipped).
        text = seq.text.add(token)[0] if p.include_stop_str_in_output else ""
        return TokenEnd(text + seq.text.flush(), "stop", token if own_stop else None)
    text, stopped = seq.text.add(token, check_stops=may_stop)
    if stopped:
        return TokenEnd(text, "stop", seq.text.stop_reason)
    if seq.matcher is not None and seq.matcher.is_finished():  # the constraint allows nothing more
        return TokenEnd(text + seq.text.flush(), "stop")
    if len(seq.output_token_ids) >= p.max_new_tokens:
        return TokenEnd(text + seq.text.flush(), "length")
    return TokenEnd(text, None)
