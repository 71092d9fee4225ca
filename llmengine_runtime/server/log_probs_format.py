"""OpenAI's log-prob objects from the runtime's outputs: the legacy completions `logprobs` (with `echo`, the
prompt's tokens first), the chat `logprobs.content` entries with their `top_logprobs`, and vLLM's
`prompt_logprobs` (one entry per prompt token, the first null: {token id: {logprob, rank, decoded_token}} for the
prompt's own token and the N most likely ones; -inf written as -9999.0, as vLLM clamps it).

Token texts: with top-N or echo asked, each token id is decoded alone (`tokenizer.decode([id])`, special tokens
kept), as OpenAI names tokens, so a token in `tokens` and the same token among `top_logprobs` have the same
text. A byte-level piece of a multi-byte character then decodes to U+FFFD (and its chat `bytes` are that
character's). Otherwise a delta's text is credited to its last token, so the token texts join to the output
text exactly (runtime detokenizer). A model without a tokenizer names tokens `token_id:N`.
"""

from __future__ import annotations

from typing import Any

from llmengine_runtime.server.generation import token_entries


def token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top_dict(tokenizer: Any, top: list[tuple[int, float]] | None, chosen: str | None = None,
              chosen_lp: float | None = None) -> dict[str, float]:
    """{token text: log-prob}, most likely first; the chosen token is always in it (OpenAI: up to N + 1)."""
    entries: dict[str, float] = {}
    for token_id, lp in top or []:
        entries.setdefault(token_text(tokenizer, token_id), lp)
    if chosen is not None and chosen_lp is not None and chosen not in entries:
        entries[chosen] = chosen_lp
    return entries


class LegacyLogProbs:
    """Accumulates one choice's legacy completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset.
    `top` is None when the request did not ask for top-N (then `top_logprobs` is null)."""

    def __init__(self, tokenizer: Any = None, top: int | None = None, per_token_text: bool = False) -> None:
        self.tokenizer, self.top, self.per_token_text = tokenizer, top, per_token_text
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self._offset = 0

    def _append(self, text: str, lp: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(lp)
        self.top_logprobs.append(top)
        self.text_offset.append(self._offset)
        self._offset += len(text)

    def add_prompt(self, out: Any) -> None:
        """The prompt's tokens (echo), from the first output: the first token's log-prob (and top) are null."""
        tops = out.prompt_top_log_probs or [None] * len(out.prompt_token_ids)
        for token_id, lp, top in zip(out.prompt_token_ids, out.prompt_log_probs, tops):
            text = token_text(self.tokenizer, token_id)  # (the prompt's top-N may be prompt_logprobs' larger N)
            self._append(text, lp, None if lp is None or self.top is None
                         else _top_dict(self.tokenizer, (top or [])[:self.top], text, lp))

    def add(self, out: Any) -> None:
        tops = out.top_log_probs or [None] * len(out.token_ids)
        for (delta_text, lp), token_id, top in zip(token_entries(out), out.token_ids, tops):
            text = token_text(self.tokenizer, token_id) if self.per_token_text else delta_text
            self._append(text, lp, None if self.top is None else _top_dict(self.tokenizer, top, text, lp))

    def since(self, start: int) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": None if self.top is None else self.top_logprobs[start:],
                "text_offset": self.text_offset[start:]}


def chat_content(out: Any, tokenizer: Any, top: int, by_id: bool = False) -> list[dict]:
    """OpenAI's chat `logprobs.content` entries for a delta's tokens; with `top` > 0 each has its top_logprobs
    [{token, logprob, bytes}] and tokens are named by decoding each alone; with `by_id` (vLLM's
    return_tokens_as_token_ids) every token is named `token_id:N`."""
    tops = out.top_log_probs or [[] for _ in out.token_ids]
    if by_id:
        tokenizer = None
    entries = []
    for (delta_text, lp), token_id, top_ids in zip(token_entries(out), out.token_ids, tops):
        text = token_text(tokenizer, token_id) if top or by_id else delta_text
        alternatives = [{"token": t, "logprob": v, "bytes": list(t.encode())}
                        for t, v in _top_dict(tokenizer, top_ids[:top]).items()] if top else []
        entries.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": alternatives})
    return entries


def prompt_logprobs(out: Any, tokenizer: Any, n: int) -> list[dict[str, dict] | None] | None:
    """vLLM's `prompt_logprobs` from an output that carries the prompt's scores (None when it does not): per prompt
    token None for the first, else {str(token id): {"logprob", "rank", "decoded_token"}} holding the token itself
    (its rank: 1 + the tokens more likely than it) and the n most likely tokens (ranks 1..n)."""
    if out.prompt_log_probs is None or out.prompt_token_ids is None:
        return None
    count = len(out.prompt_token_ids)
    ranks = out.prompt_ranks or [None] * count
    tops = out.prompt_top_log_probs or [None] * count

    def entry(token_id: int, lp: float, rank: int | None) -> dict:
        return {"logprob": max(lp, -9999.0), "rank": rank, "decoded_token": token_text(tokenizer, token_id)}

    result: list[dict[str, dict] | None] = []
    for token_id, lp, rank, top in zip(out.prompt_token_ids, out.prompt_log_probs, ranks, tops):
        if lp is None:
            result.append(None)
            continue
        entries = {str(token_id): entry(token_id, lp, rank)}
        for r, (top_id, top_lp) in enumerate((top or [])[:n], start=1):
            entries.setdefault(str(top_id), entry(top_id, top_lp, r))
        result.append(entries)
    return result
