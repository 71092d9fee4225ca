"""Top-N log-probs of emitted tokens, and the log-probs of prompt tokens (scoring a text).

`top_log_probs(log_probs, ns)`: for the rows that ask (ns[i] > 0), the ns[i] most likely (token id, log-prob)
of that row's distribution, from one batched topk and one host transfer. Tokens of probability 0 (-inf, cut by
top-k/top-p) are left out, so a row may get fewer than it asked for.

`score_positions(model, hidden, targets, ns)`: the log-prob of each target token under the model's distribution
at temperature 1 (raw logits, no penalties) at the position before it, its rank in that distribution (1 + the
number of tokens with a strictly higher log-prob, vLLM's), plus its top-N. It computes the logits
of at most `ROWS_PER_SLICE` positions at a time and keeps only those numbers, never a whole `[positions, vocab]`
block, so scoring a long prompt costs `ROWS_PER_SLICE x vocab` floats at a time.
"""

from __future__ import annotations

import math

import torch

TopLogProbs = list[tuple[int, float]]  # (token id, log-prob), most likely first
Scores = tuple[list[float], list[int], list[TopLogProbs]]  # per scored position: log-prob, rank, top-N
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


def score_positions(model, hidden: torch.Tensor, targets: list[int], ns: list[int]) -> Scores:
    """The log-prob of targets[i] given the hidden state `hidden[i]` (the position before it), its rank there, and
    the top-ns[i] of that distribution. `model.compute_logits` maps hidden states to logits."""
    log_probs: list[float] = []
    ranks: list[int] = []
    tops: list[TopLogProbs] = []
    for s in range(0, len(targets), ROWS_PER_SLICE):
        rows = torch.log_softmax(model.compute_logits(hidden[s:s + ROWS_PER_SLICE]).float(), dim=-1)
        index = torch.tensor(targets[s:s + ROWS_PER_SLICE], dtype=torch.int64).to(rows.device)
        picked = rows.gather(1, index[:, None])
        above = (rows > picked).sum(dim=1)  # tokens strictly more likely than the target
        host = torch.stack([picked.squeeze(1).double(), above.double()]).tolist()  # one transfer
        log_probs += host[0]
        ranks += [int(n) + 1 for n in host[1]]
        tops += top_log_probs(rows, ns[s:s + ROWS_PER_SLICE])
    return log_probs, ranks, tops


def prompt_scores(seq) -> dict:
    """RequestOutput's `prompt_log_probs` ([None, lp_1, ...], one per prompt token), `prompt_ranks` and
    `prompt_top_log_probs` (None first too; the latter None when no top-N was asked) for a
    `runtime.sequence.Sequence`, once all its prompt positions are scored; {} before that, after they were sent, or
    when not asked."""
    if not seq.params.prompt_log_probs or seq.prompt_log_probs_sent \
            or len(seq.prompt_log_probs) < seq.num_prompt_tokens - 1:
        return {}
    seq.prompt_log_probs_sent = True
    tops = [None, *seq.prompt_top_log_probs] if seq.params.prompt_top_n else None
    return {"prompt_log_probs": [None, *seq.prompt_log_probs], "prompt_top_log_probs": tops,
            "prompt_ranks": [None, *seq.prompt_ranks],
            "prompt_token_ids": list(seq.prompt_token_ids)}
