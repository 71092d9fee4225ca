"""Top-N log-probs of emitted tokens, and the log-probs of prompt tokens (scoring a text).

`top_log_probs(log_probs, ns)`: for the rows that ask (ns[i] > 0), the ns[i] most likely (token id, log-prob)
of that row's distribution, from one batched topk and one host transfer. Tokens of probability 0 (-inf, cut by
top-k/top-p) are left out, so a row may get fewer than it asked for.

`score_positions(model, hidden, targets, ns)`: the log-prob of each target token under the model's distribution
at temperature 1 (raw logits, no penalties) at the position before it, plus its top-N. It computes the logits
of at most `ROWS_PER_SLICE` positions at a time and keeps only those numbers, never a whole `[positions, vocab]`
block, so scoring a long prompt costs `ROWS_PER_SLICE x vocab` floats at a time.
"""

from __future__ import annotations

import math

import torch

TopLogProbs = list[tuple[int, float]]  # (token id, log-prob), most likely first
ROWS_PER_SLICE = 256


def top_log_probs(log_probs: torch.Tensor, ns: list[int]) -> list[TopLogProbs]:
    """Per row of `log_probs` `[B, V]`, its ns[i] most likely (token, log-prob), finite ones only; [] where
    ns[i] is 0."""
    rows = [i for i, n in enumerate(ns) if n > 0]
    result: list[TopLogProbs] = [[] for _ in ns]
    if not rows:
        return result
    k = min(max(ns), log_probs.shape[-1])
    picked = log_probs if len(rows) == log_probs.shape[0] else log_probs[rows]
    values, ids = picked.topk(k, dim=-1)
    host = torch.cat([values.double(), ids.double()], dim=-1).tolist()  # one transfer (ids < 2**53: exact)
    for row, line in zip(rows, host):
        n = min(ns[row], k)
        result[row] = [(int(t), v) for v, t in zip(line[:n], line[k:k + n]) if v != -math.inf]
    return result


def score_positions(model, hidden: torch.Tensor, targets: list[int],
                    ns: list[int]) -> tuple[list[float], list[TopLogProbs]]:
    """The log-prob of targets[i] given the hidden state `hidden[i]` (the position before it), and the top-ns[i]
    of that distribution. `model.compute_logits` maps hidden states to logits."""
    log_probs: list[float] = []
    tops: list[TopLogProbs] = []
    for s in range(0, len(targets), ROWS_PER_SLICE):
        rows = torch.log_softmax(model.compute_logits(hidden[s:s + ROWS_PER_SLICE]).float(), dim=-1)
        index = torch.tensor(targets[s:s + ROWS_PER_SLICE], dtype=torch.int64).to(rows.device)
        log_probs += rows.gather(1, index[:, None]).squeeze(1).tolist()
        tops += top_log_probs(rows, ns[s:s + ROWS_PER_SLICE])
    return log_probs, tops


def prompt_scores(seq) -> dict:
    """RequestOutput's `prompt_log_probs` ([None, lp_1, ...], one per prompt token) and `prompt_top_log_probs`
    (None first too; None when no top-N was asked) for a `runtime.sequence.Sequence`, once all its prompt
    positions are scored; {} before that, after they were sent, or when not asked."""
    if not seq.params.prompt_log_probs or seq.prompt_log_probs_sent \
            or len(seq.prompt_log_probs) < seq.num_prompt_tokens - 1:
        return {}
    seq.prompt_log_probs_sent = True
    tops = [None, *seq.prompt_top_log_probs] if seq.params.top_log_probs else None
    return {"prompt_log_probs": [None, *seq.prompt_log_probs], "prompt_top_log_probs": tops,
            "prompt_token_ids": list(seq.prompt_token_ids)}
