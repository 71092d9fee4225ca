"""Draft-model proposals: a smaller model with the target's tokenizer guesses the next k tokens, one step at a time.

The draft's KV cache mirrors the target's block pool: as many blocks of the same block_size (in the draft's own
shapes: its layers, KV heads and head_dim), so a sequence's block table addresses both caches and the draft needs
no block manager. Every slot the draft writes is in a block the scheduler gave the sequence for this step: its
tokens up to the last one, then the room for proposals. The draft cache is extra memory, outside kv_cache_gib.

`seq.proposer_state` (a `DraftState`) says how many of the sequence's tokens have draft K/V, and in which blocks.
Each step, for the sequences with room:

1. catch up: feed the tokens the draft has not computed, up to the last one (the whole prompt the first time;
   at most `max_num_batched_tokens` in all per step: a sequence whose catch-up does not fit proposes nothing
   this step, and catches up further the next one); the last row's logits give the first proposal;
2. draw each proposal from the draft's final distribution, after the request's own penalties (counting the
   proposals before it), temperature, top-k and top-p, with the request's generator (greedy: the argmax); that
   distribution is the q of the rejection rule (returned for sampled requests, a point mass for greedy ones);
3. feed the proposal to get the next row, until the sequence's room is used.

Rollback needs no work: the draft's valid length is min(what it wrote, the target's num_computed_tokens). The
accepted proposals are then the sequence's own tokens, so their draft K/V stays valid; a rejected one lies past
the target's length and is overwritten later. If a block under the valid length changed since the draft wrote
it (the prefix cache swapped in an equal block another sequence computed, whose draft K/V may never have been
written), the valid length drops to that block. Preemption drops the state (scheduler.py): the draft starts over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmengine_runtime.models.config import ModelConfig, load_config
from llmengine_runtime.models.loader import load_model
from llmengine_runtime.models.tokenizer import TOKENIZER_FILES, Tokenizer
from llmengine_runtime.runtime.engine_setup import resolve_model_dir
from llmengine_runtime.runtime.model_runner import ModelRunner
from llmengine_runtime.runtime.sampler import final_logits
from llmengine_runtime.runtime.sequence import Sequence
from llmengine_runtime.runtime.step import Chunk

NUM_TOKENS_CHECKED = 256  # token ids compared between the two tokenizers, spread over the vocabulary


@dataclass
class DraftState:
    num_computed: int = 0  # leading tokens of the sequence with draft K/V (proposals fed count too)
    blocks: list[int] = field(default_factory=list)  # the block ids those tokens were written to


def check_same_vocab(target: ModelConfig, draft: ModelConfig, target_tokenizer: Tokenizer | None,
                     draft_tokenizer: Tokenizer | None, draft_dir: Path) -> None:
    """A draft must share the target's vocabulary: the same size and, when both have tokenizers, the same token
    for a sample of ids. ValueError otherwise."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft model {draft_dir} has a vocabulary of {draft.vocab_size} tokens, the target "
                         f"{target.vocab_size}: a draft model must share the target's tokenizer")
    if target_tokenizer is None or draft_tokenizer is None:
        return
    size = min(target_tokenizer.vocab_size, draft_tokenizer.vocab_size)
    ids = sorted({i * size // NUM_TOKENS_CHECKED for i in range(NUM_TOKENS_CHECKED)} | {size - 1})
    differ = [i for i in ids if target_tokenizer.id_to_token(i) != draft_tokenizer.id_to_token(i)]
    if differ or target_tokenizer.vocab_size != draft_tokenizer.vocab_size:
        raise ValueError(f"draft model {draft_dir} has a different tokenizer (vocabulary of {draft.vocab_size} "
                         f"tokens, the target {target.vocab_size}; tokenizer sizes {draft_tokenizer.vocab_size} "
                         f"and {target_tokenizer.vocab_size}; ids {differ[:5]} differ): a draft model must share the "
                         "target's tokenizer")


class DraftProposer:
    def __init__(self, runner: ModelRunner, max_num_batched_tokens: int):
        self.runner = runner
        self.block_size = runner.block_size
        self.max_num_batched_tokens = max_num_batched_tokens

    @classmethod
    def for_engine(cls, model: str | Path, engine) -> DraftProposer:
        """The draft `model` (zoo name or folder) for `engine`'s target: checked, loaded in the target's dtype
        on its device (the target's own weights when it is the same folder), with a cache of the target's
        geometry."""
        draft_dir = resolve_model_dir(model)
        config = load_config(draft_dir)
        has_tokenizer = any((draft_dir / name).is_file() for name in TOKENIZER_FILES)
        check_same_vocab(engine.config, config, engine.tokenizer,
                         Tokenizer.from_folder(draft_dir) if has_tokenizer else None, draft_dir)
        if draft_dir.resolve() == engine.model_dir.resolve():
            draft_model = engine.model  # the target as its own draft: one copy of the weights
        else:
            draft_model = load_model(draft_dir, engine.dtype, engine.device, progress=False, config=config)
        runner = ModelRunner(draft_model, engine.runner.num_blocks, engine.runner.block_size)
        return cls(runner, engine.max_num_batched_tokens)

    def valid_length(self, seq: Sequence) -> int:
        """Leading tokens of `seq` whose draft K/V is in the cache now (see the module docstring); the state
        forgets the rest."""
        state = seq.proposer_state
        if not isinstance(state, DraftState):
            seq.proposer_state = state = DraftState()
        valid = min(state.num_computed, seq.num_computed_tokens)
        for j, (was, now) in enumerate(zip(state.blocks, seq.block_table)):
            if was != now:
                valid = min(valid, j * self.block_size)
                break
        state.num_computed = valid
        return valid

    def propose_seqs(self, seqs: list[Sequence], max_tokens: list[int]) -> tuple[list[list[int]], torch.Tensor | None]:
        """Up to max_tokens[i] proposals for seqs[i] (each in decode: all computed but its last token), and the
        draft distributions `[sum k_i, V]` they were drawn from (None when every request is greedy)."""
        proposals: list[list[int]] = [[] for _ in seqs]
        draws: list[list[torch.Tensor | None]] = [[] for _ in seqs]  # q per proposal (None: greedy)
        chunks, active = [], []
        budget = self.max_num_batched_tokens
        for i, (seq, room) in enumerate(zip(seqs, max_tokens)):
            start = self.valid_length(seq)
            take = min(seq.num_tokens - start, budget)
            if room <= 0 or take <= 0:
                continue
            budget -= take
            caught_up = start + take == seq.num_tokens
            chunks.append(Chunk(seq.token_ids(start, start + take), start, seq.block_table, int(caught_up)))
            seq.proposer_state.num_computed = start + take
            if caught_up:
                active.append(i)
        logits = self.runner.run(chunks) if chunks else None
        while active:
            tokens, probs = self._draw(logits, [seqs[i] for i in active], [proposals[i] for i in active])
            for i, token, q in zip(active, tokens, probs):
                proposals[i].append(token)
                draws[i].append(q)
            active = [i for i in active if len(proposals[i]) < max_tokens[i]]
            if active:  # feed the proposals just drawn for the next row
                logits = self.runner.run([Chunk([proposals[i][-1]], seqs[i].num_tokens + len(proposals[i]) - 1,
                                                seqs[i].block_table, 1) for i in active])
                for i in active:
                    seqs[i].proposer_state.num_computed += 1
        for seq in seqs:
            state = seq.proposer_state
            state.blocks = list(seq.block_table[:-(-state.num_computed // self.block_size)])
        return proposals, self._draft_probs(proposals, draws)

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence],
              proposed: list[list[int]]) -> tuple[list[int], list[torch.Tensor | None]]:
        """One proposal per row of draft logits, and the distribution it was drawn from (None: greedy)."""
        params = [seq.params for seq in seqs]
        penalised = any(p.presence_penalty or p.frequency_penalty for p in params)
        output_ids = [seq.output_token_ids + drafts for seq, drafts in zip(seqs, proposed)] if penalised \
            else [[]] * len(seqs)
        final = final_logits(logits, params, output_ids)
        tokens = final.argmax(dim=-1)
        probs: list[torch.Tensor | None] = [None] * len(seqs)
        for j, (seq, p) in enumerate(zip(seqs, params)):
            if not p.greedy:
                probs[j] = final[j].softmax(dim=-1)
                tokens[j] = torch.multinomial(probs[j], 1, generator=seq.generator)[0]
        return tokens.tolist(), probs

    def _draft_probs(self, proposals: list[list[int]], draws: list[list[torch.Tensor | None]]) -> torch.Tensor | None:
        """`[sum k_i, V]`: each sampled proposal's q, a one-hot row for each greedy one; None if all are greedy."""
        rows = [q for qs in draws for q in qs]
        if all(q is None for q in rows):
            return None
        vocab = next(q for q in rows if q is not None).shape[-1]
        packed = torch.zeros(len(rows), vocab, device=self.runner.device)
        tokens = [t for ts in proposals for t in ts]
        for r, (q, token) in enumerate(zip(rows, tokens)):
            if q is None:
                packed[r, token] = 1.0
            else:
                packed[r] = q
        return packed
