"""Speculative decoding in the engine's step: proposals before the forward pass, verification after it.

The engine's step with a `Speculator`:

1. the scheduler gives each sequence in decode room for up to `lookahead(seq)` proposals (k, capped so the
   step's emitted tokens, proposals plus one of the target's own, fit max_new_tokens and max_model_len; 0 for
   a request with `speculate=False`): its entry is (seq, 1 + room);
2. `propose(batch)` asks the proposer for up to `room` tokens per such sequence that is not backing off after
   rejected proposals (speculative/backoff.py; the engine calls `record` with each outcome), puts them in
   `seq.draft_token_ids` and shrinks the entry to (seq, 1 + k_i); k_i = 0 is a plain decode; a guided request's
   proposals are cut before the first one its constraint forbids (`trim_to_constraints`), and the engine masks
   its rows as after the earlier proposals (runtime/guided.py), so no forbidden token is ever accepted;
3. the runner feeds `[last token] + proposals` as one chunk and returns k_i + 1 rows of logits for it;
4. `verify(...)` turns the rows into the sampler's final logits (penalties counting the proposals before each
   row, temperature, top-k, top-p) and accepts with `verify_proposals`: 1..k_i + 1 tokens per sequence, with
   their log-probs. Sequences without proposals this step go through the plain sampler instead, so a step
   where nothing was proposed is exactly a plain step (and a seeded request draws as it would without
   speculation whenever it proposes nothing). A step whose sequences are all greedy, without penalties or logits
   processing, is verified from each row's argmax (the C++ step's, when it took them and no log-probs are asked
   for) by `accept_greedy`: the same tokens and log-probs, with no pass over the `[rows, V]` logits.

A request that asks for top-N log-probs or prompt log-probs never speculates (`lookahead` 0): its tokens come
from the plain sampler, which gives their top-N.

The engine then sets `num_computed_tokens` to the last token plus the accepted proposals, appends the emitted
tokens one by one and gives back the blocks past the new length (engine.py).

Proposers: `NgramSource` (prompt lookup over each sequence's own tokens) and `DraftProposer`
(speculative/draft.py, a smaller model). Both have `propose_seqs(seqs, max_tokens) -> (proposals,
draft_probs)`, draft_probs `[sum k_i, V]` or None for point masses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from llmengine_runtime.runtime.greedy import greedy_rows
from llmengine_runtime.runtime.log_probs import TopLogProbs
from llmengine_runtime.runtime.params import SamplingParams
from llmengine_runtime.runtime.sampler import Sampler, final_logits, plain_greedy
from llmengine_runtime.runtime.sequence import Sequence
from llmengine_runtime.runtime.speculative import (
    NgramProposer,
    TokenHistory,
    output_ids_per_row,
    repeat_per_row,
    verify_proposals,
)
from llmengine_runtime.runtime.speculative.backoff import may_propose, proposal_room, record_outcome
from llmengine_runtime.runtime.speculative.verify import accept_greedy


class SequenceProposer(Protocol):
    def propose_seqs(self, seqs: list[Sequence],
                     max_tokens: list[int]) -> tuple[list[list[int]], torch.Tensor | None]: ...


class NgramSource:
    """N-gram proposals for engine sequences: each keeps a TokenHistory in `seq.proposer_state`."""

    def __init__(self, ngram: NgramProposer):
        self.ngram = ngram

    def propose_seqs(self, seqs: list[Sequence], max_tokens: list[int]) -> tuple[list[list[int]], None]:
        histories = []
        for seq in seqs:
            if not isinstance(seq.proposer_state, TokenHistory):
                seq.proposer_state = TokenHistory(seq.prompt_token_ids)
            histories.append(seq.proposer_state.update(seq.output_token_ids))
        return self.ngram.propose_batch(histories, max_tokens)


def proposed_in(batch: list[tuple[Sequence, int]]) -> list[tuple[int, Sequence, int]]:
    """(index, seq, room) of the entries the scheduler gave room for proposals: more tokens than it has left."""
    return [(i, seq, n - 1) for i, (seq, n) in enumerate(batch) if n > seq.num_uncomputed_tokens]


class Speculator:
    def __init__(self, proposer: SequenceProposer, num_speculative_tokens: int, max_model_len: int):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens}: accepted an integer >= 1")
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.sampler = Sampler()

    def lookahead(self, seq: Sequence) -> int:
        """How many proposals `seq` may get this step: k, leaving room for the target's own token within
        max_new_tokens and max_model_len; 0 if the request opted out."""
        if not seq.params.speculate or seq.params.top_log_probs or seq.params.prompt_log_probs:
            return 0
        tokens_left = min(seq.params.max_new_tokens - len(seq.output_token_ids), self.max_model_len - seq.num_tokens)
        return max(0, min(self.num_speculative_tokens, tokens_left - 1))

    def propose(self, batch: list[tuple[Sequence, int]]) -> tuple[list[tuple[Sequence, int]], torch.Tensor | None]:
        """Proposals for the entries with room (into `seq.draft_token_ids`), the batch with those entries
        trimmed to 1 + k_i, and the draft distributions `[sum k_i, V]` (None: point masses)."""
        entries, batch = [], list(batch)
        for i, seq, room in proposed_in(batch):
            if may_propose(seq):
                entries.append((i, seq, proposal_room(seq, room)))
            else:  # backing off: a plain decode
                batch[i] = (seq, batch[i][1] - room)
        if not entries:
            return batch, None
        seqs = [seq for _, seq, _ in entries]
        proposals, draft_probs = self.proposer.propose_seqs(seqs, [room for _, _, room in entries])
        if any(seq.matcher is not None for seq in seqs):
            proposals, draft_probs = trim_to_constraints(seqs, proposals, draft_probs)
        for (i, seq, room), tokens in zip(entries, proposals):
            if len(tokens) > room:
                raise RuntimeError(f"the proposer gave {len(tokens)} tokens where there is room for {room}")
            seq.draft_token_ids = list(tokens)
            batch[i] = (seq, 1 + len(tokens))
        return batch, (draft_probs if any(proposals) else None)

    @staticmethod
    def record(seq: Sequence, num_proposed: int, num_accepted: int) -> None:
        """Tell the back-off how `seq`'s proposals fared this step."""
        record_outcome(seq, num_proposed, num_accepted)

    def verify(self, seqs: list[Sequence], logits: torch.Tensor, num_rows: list[int],
               draft_probs: torch.Tensor | None, need_log_probs: bool = True, argmax: list[int] | None = None
               ) -> tuple[list[list[int]], list[list[float]], list[list[TopLogProbs]]]:
        """Emitted tokens, their log-probs and their top-N per sampling sequence, from its 1 + k_i rows of logits
        (top-N only from the plain sampler's rows: a sequence that asks for them does not speculate). As for the
        sampler, `need_log_probs=False` lets a greedy batch return NaN log-probs, and `argmax` (each logits row's,
        when the model step took it) then stands for the pass over the logits."""
        if all(n == 1 for n in num_rows):
            tokens, log_probs, tops = self.sampler.sample(logits, seqs, need_log_probs, argmax)
            return [[t] for t in tokens], [[lp] for lp in log_probs], [[top] for top in tops]
        if all(plain_greedy(seq) for seq in seqs):  # the argmax rows decide: no torch op per row
            if argmax is None or need_log_probs:
                row_tokens, row_log_probs = greedy_rows(logits)
                argmax, row_lp = row_tokens.tolist(), row_log_probs.tolist()
            else:
                row_lp = [float("nan")] * len(argmax)
            drafts = [seq.draft_token_ids if n > 1 else [] for seq, n in zip(seqs, num_rows)]
            tokens, log_probs = accept_greedy(argmax, row_lp, drafts)
            return tokens, log_probs, [[[] for _ in t] for t in tokens]
        starts = [0]
        for n in num_rows:
            starts.append(starts[-1] + n)
        spec = [i for i, n in enumerate(num_rows) if n > 1]
        plain = [i for i, n in enumerate(num_rows) if n == 1]
        emitted: list[list[int]] = [[] for _ in seqs]
        emitted_log_probs: list[list[float]] = [[] for _ in seqs]
        emitted_tops: list[list[TopLogProbs]] = [[] for _ in seqs]
        if plain:
            tokens, log_probs, tops = self.sampler.sample(logits[[starts[i] for i in plain]], [seqs[i] for i in plain])
            for i, token, log_prob, top in zip(plain, tokens, log_probs, tops):
                emitted[i], emitted_log_probs[i], emitted_tops[i] = [token], [log_prob], [top]
        spec_seqs = [seqs[i] for i in spec]
        rows = [r for i in spec for r in range(starts[i], starts[i + 1])]
        drafts = [seq.draft_token_ids for seq in spec_seqs]
        params: list[SamplingParams] = repeat_per_row([seq.params for seq in spec_seqs], list(map(len, drafts)))
        penalised = any(p.presence_penalty or p.frequency_penalty for p in params)
        output_ids = [ids for seq in spec_seqs for ids in output_ids_per_row(seq.output_token_ids, seq.draft_token_ids)
                      ] if penalised else [[]] * len(rows)
        spec_logits = logits[rows] if len(rows) < logits.shape[0] else logits
        tokens, log_probs = verify_proposals(final_logits(spec_logits, params, output_ids), drafts,
                                             [seq.params.greedy for seq in spec_seqs],
                                             [seq.generator for seq in spec_seqs], draft_probs)
        for i, t, lp in zip(spec, tokens, log_probs):
            emitted[i], emitted_log_probs[i], emitted_tops[i] = t, lp, [[] for _ in t]
        return emitted, emitted_log_probs, emitted_tops


def trim_to_constraints(seqs: list[Sequence], proposals: list[list[int]],
                        draft_probs: torch.Tensor | None) -> tuple[list[list[int]], torch.Tensor | None]:
    """Cut each guided sequence's proposals before the first one its constraint forbids (verification would
    reject it and everything after it: no use computing them), and the draft distributions' rows with them."""
    trimmed, kept_rows, start = [], [], 0
    for seq, tokens in zip(seqs, proposals):
        n = seq.matcher.valid_prefix_len(tokens) if seq.matcher is not None and tokens else len(tokens)
        trimmed.append(list(tokens[:n]))
        kept_rows.extend(range(start, start + n))
        start += len(tokens)
    if draft_probs is not None and len(kept_rows) < start:
        draft_probs = draft_probs[kept_rows]
    return trimmed, draft_probs


def make_speculator(speculative: str | Path | None, num_speculative_tokens: int, prompt_lookup_min: int,
                    prompt_lookup_max: int, engine) -> Speculator | None:
    """`speculative`: None (off), "ngram", or a draft model (zoo name or folder) for `engine`'s target."""
    if speculative is None:
        return None
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens={num_speculative_tokens}: accepted an integer >= 1")
    if str(speculative) == "ngram":
        proposer: SequenceProposer = NgramSource(NgramProposer(num_speculative_tokens, prompt_lookup_min,
                                                               prompt_lookup_max))
    else:
        from llmengine_runtime.runtime.speculative.draft import DraftProposer

        proposer = DraftProposer.for_engine(speculative, engine)
    return Speculator(proposer, num_speculative_tokens, engine.max_model_len)
