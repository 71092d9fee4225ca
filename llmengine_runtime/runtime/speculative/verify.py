"""Speculative decoding's verification: which proposed tokens the target model accepts, and the token after them.

Sequence i proposed k_i tokens x_0..x_{k_i-1} (k_i may be 0: a plain decode). The target model scored its last
token and the proposals, k_i + 1 rows of logits; row j is the target's distribution p_j for the token after
x_{j-1} (row 0: after the last real token). The rows of all sequences are packed in order: `[sum(k_i + 1), V]`.
They must be the logits the plain sampler would draw from: penalties (row j counting the outputs plus x_0..x_{j-1}
as generated, see `output_ids_per_row`), then, for sampled sequences, temperature, top-k and top-p.

Greedy sequences accept x_j while it equals the argmax of row j, then emit the argmax of the row where that
stops (a correction, or the bonus token after all k_i). Sampled sequences follow the rejection rule of Leviathan
et al. and Chen et al. (2023): accept x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection
draw from norm(max(0, p_j - q_j)) and stop; after k_i acceptances draw the bonus token from p_{k_i}. The
emitted tokens are then distributed exactly as tokens drawn one at a time from p. The draft distribution q is
`[sum(k_i), V]` packed like the proposals, or None for a point mass on each proposal (n-gram proposals).

Each sampled sequence draws k_i + 1 uniforms from its own generator (None: torch's default one), k_i for the
acceptance tests and one for the final draw (by inverse CDF, in float64), so seeded requests are reproducible
whatever else is in the batch. Every emitted token comes with its log-prob under its row's distribution
(log-softmax of the given logits), as the sampler reports. The whole batch costs one host sync (a .tolist()).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from llmengine_runtime.runtime.greedy import greedy_rows

T = TypeVar("T")


def output_ids_per_row(output_token_ids: list[int], draft_token_ids: Sequence[int]) -> list[list[int]]:
    """What row j of a speculating sequence counts as generated, for presence/frequency penalties:
    `[out, out + x_0, ..., out + x_0..x_{k-1}]` (k + 1 lists)."""
    return [output_token_ids + list(draft_token_ids[:j]) for j in range(len(draft_token_ids) + 1)]


def repeat_per_row(values: Sequence[T], num_draft: Sequence[int]) -> list[T]:
    """One value per sequence -> one per row of its k_i + 1 rows (for sampling-parameter columns)."""
    return [value for value, k in zip(values, num_draft) for _ in range(k + 1)]


def accept_draft(u: torch.Tensor, p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """u < min(1, p(x) / q(x)) for uniforms u in [0, 1), written without the division: q(x) = 0 accepts
    whenever p(x) > 0, and p(x) = 0 never accepts."""
    return u * q_x < p_x


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row; p itself where that is all zero (p = q up to rounding)."""
    residual = (p - q).clamp_(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(p.dtype).tiny), p)


def draw_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs `[N, V]` from uniforms u `[N]` (float64): the first token whose cumulative
    probability exceeds u times the row's total. That point stays below the total even where rounding would
    reach it, so the token is never one of zero probability."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1]
    point = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point[:, None], right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _layout(draft_token_ids: list[list[int]], greedy: list[bool]) -> list[int]:
    """Host-side index columns, packed as one list: per row (sequence, proposal at the row or 0, packed
    proposal index or 0), then per sequence (bonus row, greedy)."""
    row_seq, row_draft, row_draft_index, bonus = [], [], [], []
    draft_index = 0
    for i, drafts in enumerate(draft_token_ids):
        k = len(drafts)
        bonus.append(len(row_seq) + k)
        row_seq += [i] * (k + 1)
        row_draft += [*drafts, 0]
        row_draft_index += [*range(draft_index, draft_index + k), 0]
        draft_index += k
    return row_seq + row_draft + row_draft_index + bonus + [int(g) for g in greedy]


def _uniforms(draft_token_ids: list[list[int]], starts: list[int], greedy: list[bool],
              generators: list[torch.Generator | None], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """k_i + 1 float64 uniforms per sampled sequence from its generator (one call for all unseeded ones),
    zeros for greedy ones; returned concatenated in draw order, with the row each lands on."""
    unseeded = [i for i, (g, gen) in enumerate(zip(greedy, generators)) if not g and gen is None]
    seeded = [i for i, (g, gen) in enumerate(zip(greedy, generators)) if not g and gen is not None]
    rest = [i for i, g in enumerate(greedy) if g]
    chunks = [torch.rand(sum(len(draft_token_ids[i]) + 1 for i in unseeded), dtype=torch.float64, device=device)]
    chunks += [torch.rand(len(draft_token_ids[i]) + 1, dtype=torch.float64, device=device, generator=generators[i])
               for i in seeded]
    chunks.append(torch.zeros(sum(len(draft_token_ids[i]) + 1 for i in rest), dtype=torch.float64, device=device))
    rows = [row for i in unseeded + seeded + rest for row in range(starts[i], starts[i + 1])]
    return torch.cat(chunks), rows


def accept_greedy(row_argmax: list[int], row_log_probs: list[float],
                  draft_token_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy verification from each row's argmax and its log-prob alone (rows packed as `verify_proposals` takes
    them, for sequences without penalties): x_j is accepted while it equals row j's argmax, so the emitted tokens
    are the argmax of rows 0..stop. The same tokens and log-probs `verify_proposals` gives greedy rows, without a
    pass over the logits."""
    tokens, log_probs, at = [], [], 0
    for drafts in draft_token_ids:
        j = 0
        while j < len(drafts) and drafts[j] == row_argmax[at + j]:
            j += 1
        tokens.append(row_argmax[at:at + j + 1])
        log_probs.append(row_log_probs[at:at + j + 1])
        at += len(drafts) + 1
    if at != len(row_argmax):
        raise ValueError(f"{len(row_argmax)} rows for {len(draft_token_ids)} sequences with {at - len(draft_token_ids)}"
                         f" proposals: expected {at} rows")
    return tokens, log_probs


def verify_proposals(logits: torch.Tensor, draft_token_ids: list[list[int]], greedy: list[bool],
                     generators: list[torch.Generator | None] | None = None,
                     draft_probs: torch.Tensor | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Emitted tokens (1..k_i + 1 per sequence: the accepted proposals, then a correction or bonus token) and
    their log-probs. logits `[sum(k_i + 1), V]` packed as the module docstring says; draft_token_ids[i] the
    k_i proposals; greedy[i] the sequence's rule; generators[i] its generator (None: default; all None if not
    given); draft_probs `[sum(k_i), V]` the distributions the proposals were drawn from, None: point masses."""
    num_seqs, (num_rows, vocab) = len(draft_token_ids), logits.shape
    num_drafts = sum(map(len, draft_token_ids))
    if num_rows != num_drafts + num_seqs or len(greedy) != num_seqs:
        raise ValueError(f"{num_rows} rows of logits and {len(greedy)} greedy flags for {num_seqs} sequences "
                         f"with {num_drafts} proposals: expected {num_drafts + num_seqs} rows")
    if draft_probs is not None and draft_probs.shape != (num_drafts, vocab):
        raise ValueError(f"draft_probs {tuple(draft_probs.shape)}: expected ({num_drafts}, {vocab})")
    if num_seqs == 0:
        return [], []
    device = logits.device
    generators = generators if generators is not None else [None] * num_seqs
    starts = [0]  # each sequence's first row, and the end
    for drafts in draft_token_ids:
        starts.append(starts[-1] + len(drafts) + 1)
    uniforms_in_draw_order, draw_rows = _uniforms(draft_token_ids, starts, greedy, generators, device)
    columns = torch.tensor(_layout(draft_token_ids, greedy) + draw_rows, dtype=torch.int64)
    if device.type == "cuda":
        columns = columns.pin_memory()
    columns = columns.to(device, non_blocking=True)
    row_seq, row_draft, row_draft_index, seq_bonus, seq_greedy, draw_row = columns.split(
        [num_rows] * 3 + [num_seqs] * 2 + [num_rows])
    seq_greedy = seq_greedy.bool()
    uniforms = torch.empty(num_rows, dtype=torch.float64, device=device).index_copy_(0, draw_row,
                                                                                      uniforms_in_draw_order)

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    # A greedy row's token and log-prob as plain decoding takes them (runtime/greedy.py), so that greedy speculation
    # is lossless to the bit; sampled rows draw from log_probs.
    greedy_argmax, greedy_log_prob = greedy_rows(logits)
    target_argmax = greedy_argmax.to(device)
    rows = torch.arange(num_rows, device=device)
    is_bonus = rows == seq_bonus[row_seq]
    p_x = log_probs[rows, row_draft].exp()
    if draft_probs is None or num_drafts == 0:
        q_x = torch.ones_like(p_x)
    else:
        q_x = draft_probs.float()[row_draft_index, row_draft]
    accepted = torch.where(seq_greedy[row_seq], row_draft == target_argmax, accept_draft(uniforms, p_x, q_x))
    # Each sequence stops at its first rejected proposal, or at its bonus row.
    stop = is_bonus | ~accepted
    stop_row = torch.full((num_seqs,), num_rows, dtype=torch.int64, device=device).scatter_reduce_(
        0, row_seq, torch.where(stop, rows, num_rows), reduce="amin")
    rejected = stop_row != seq_bonus

    final = target_argmax[stop_row]
    if not all(greedy):
        q_stop = torch.zeros(num_seqs, vocab, device=device)
        if draft_probs is None:
            q_stop[torch.arange(num_seqs, device=device), row_draft[stop_row]] = 1.0  # the point mass
        elif num_drafts:
            q_stop = draft_probs.float()[row_draft_index[stop_row]]
        q_stop = q_stop * rejected[:, None]  # the bonus row draws from p itself
        sampled = draw_inverse_cdf(residual_distribution(log_probs[stop_row].exp(), q_stop), uniforms[seq_bonus])
        final = torch.where(seq_greedy, final, sampled)
    row_token = row_draft.index_copy(0, stop_row, final)
    row_log_prob = torch.where(seq_greedy[row_seq], greedy_log_prob.to(device), log_probs[rows, row_token])

    host = torch.cat([row_token.double(), row_log_prob.double(), stop_row.double()]).tolist()
    tokens, token_log_probs = host[:num_rows], host[num_rows:2 * num_rows]
    ends = [int(s) + 1 for s in host[2 * num_rows:]]
    return ([[int(t) for t in tokens[s:e]] for s, e in zip(starts, ends)],
            [token_log_probs[s:e] for s, e in zip(starts, ends)])
