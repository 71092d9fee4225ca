"""vLLM's per-request logits processing beyond penalties, temperature, top-k and top-p: `logit_bias`,
`allowed_token_ids`, `bad_words`, `min_tokens` (the stop tokens masked until then) and `repetition_penalty`, applied
to the raw logits (after the guided-decoding mask, before penalties and temperature); and `min_p`, applied by
`final_logits` after temperature, top-k and top-p.

    seq.processing = logits_processing(params, tokenizer, vocab_size, stop_token_ids)   # once, in make_sequence
    logits = apply_logits_processing(logits, seqs)                                       # each step, in the sampler

A request's fixed part (its bias and its allowed tokens) is one additive row built once; what depends on the
output so far (bad words that would complete, stop tokens before `min_tokens`, the repetition penalty's tokens) is
looked up each step. Rows of requests without processing are not touched, and the tensor the caller passed is
never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llmengine_runtime.runtime.params import SamplingParams


@dataclass(eq=False)
class LogitsProcessing:
    """One request's processing, prepared from its SamplingParams (token ids checked against the vocabulary)."""

    vocab_size: int
    bias: dict[int, float] = field(default_factory=dict)  # logit_bias
    allowed: list[int] | None = None  # allowed_token_ids
    bad_words: list[list[int]] = field(default_factory=list)  # token sequences that must not be completed
    min_tokens: int = 0
    stop_ids: list[int] = field(default_factory=list)  # masked while fewer than min_tokens tokens were generated
    repetition_penalty: float = 1.0
    _fixed: dict[tuple[torch.device, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def fixed_row(self, device: torch.device, width: int) -> torch.Tensor | None:
        """The additive row `[width]` of the bias and the allowed tokens (-inf elsewhere), or None if neither is
        asked (width: the logits', which may exceed the vocabulary)."""
        if not self.bias and self.allowed is None:
            return None
        key = (device, width)
        if key not in self._fixed:
            row = torch.zeros(width)
            if self.allowed is not None:
                row.fill_(float("-inf"))
                row[self.allowed] = 0.0
            for token, value in self.bias.items():
                row[token] += value
            self._fixed[key] = row.to(device)
        return self._fixed[key]

    def banned(self, output_ids: list[int]) -> list[int]:
        """Tokens that must not come next: the last token of each bad word whose other tokens end the output, and
        the stop tokens while the output is shorter than min_tokens."""
        banned = [word[-1] for word in self.bad_words
                  if len(word) == 1 or output_ids[-(len(word) - 1):] == word[:-1]]
        if len(output_ids) < self.min_tokens:
            banned += self.stop_ids
        return banned

    def apply(self, row: torch.Tensor, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        """This request's logits row `[V]` after its processing (a new tensor)."""
        fixed = self.fixed_row(row.device, row.shape[-1])
        row = row + fixed if fixed is not None else row.clone()
        if self.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.int64, device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / self.repetition_penalty, values * self.repetition_penalty)
        banned = self.banned(output_ids)
        if banned:
            row[torch.tensor(banned, dtype=torch.int64, device=row.device)] = float("-inf")
        return row


def _check_ids(name: str, ids: Any, vocab_size: int) -> list[int]:
    ids = [int(t) for t in ids]
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise ValueError(f"{name}: token ids {outside[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def bad_word_ids(words: list[str], tokenizer: Any) -> list[list[int]]:
    """Each bad word as the model may write it: alone (at the start of a text) and after a space, as vLLM does."""
    if words and tokenizer is None:
        raise ValueError("bad_words need a tokenizer; this model folder has none")
    sequences: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def logits_processing(params: SamplingParams, tokenizer: Any, vocab_size: int,
                      stop_token_ids: set[int]) -> LogitsProcessing | None:
    """The request's processing, or None when it asks for none of it; ValueError naming a token id outside the
    vocabulary, or bad words without a tokenizer."""
    if not (params.logit_bias or params.allowed_token_ids is not None or params.bad_words or params.min_tokens
            or params.repetition_penalty != 1.0):
        return None
    bias = dict(zip(_check_ids("logit_bias", (params.logit_bias or {}).keys(), vocab_size),
                    (float(v) for v in (params.logit_bias or {}).values())))
    allowed = None if params.allowed_token_ids is None else \
        _check_ids("allowed_token_ids", params.allowed_token_ids, vocab_size)
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(stop_token_ids))
    return LogitsProcessing(vocab_size, bias, allowed, bad_word_ids(params.bad_words, tokenizer), params.min_tokens,
                            sorted(t for t in stops if 0 <= t < vocab_size), params.repetition_penalty)


def apply_logits_processing(logits: torch.Tensor, seqs: list[Any]) -> torch.Tensor:
    """`logits` `[B, V]` with each row processed as its sequence's `processing` says (row i is seqs[i]'s); the
    same tensor when no row has any. A row the processing would leave without any finite logit (its allowed tokens
    all banned, or all forbidden by its guided constraint) keeps its unprocessed logits for this step: a row of
    -inf would make NaN probabilities, and the draw would fail the whole batch."""
    rows = [i for i, seq in enumerate(seqs) if getattr(seq, "processing", None) is not None]
    if not rows:
        return logits
    out = logits.float().clone()
    for i in rows:
        seq = seqs[i]
        row = seq.processing.apply(out[i], seq.prompt_token_ids, seq.output_token_ids)
        if bool(torch.isfinite(row).any()):
            out[i] = row
    return out


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """-inf where a token's probability is below min_p x the row's largest (min_p `[B]`, 0 = off)."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))
