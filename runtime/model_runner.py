"""One forward step of a mixed batch over the paged KV cache, which the runner owns.

For each scheduled (sequence, n) the step feeds the sequence's next n uncomputed tokens: their ids and
positions packed one sequence after another, each token's cache slot, the sequence's block table and its
length after the step (the AttentionMetadata contract of models/attention.py). It returns the
sequences that have then computed all their tokens (the ones that sample) and the fp32 logits of their
last fed token; a sequence still mid-prefill gives none.
"""

from __future__ import annotations

import torch

from models.attention import AttentionMetadata, KVCache, allocate_kv_caches
from models.causal_lm import CausalLM
from runtime.sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, compile_decode: bool = False):
        self.model = model
        # Decode steps have one shape family (one token per sequence): torch.compile fuses their many small
        # ops (norms, rotary, cache writes, masks) into a few kernels, which on CPU is most of the time
        # outside the matrix products. Prefill chunks stay eager.
        self.decode_forward = torch.compile(model.forward, dynamic=True) if compile_decode else model.forward
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.kv_caches: list[KVCache] = allocate_kv_caches(model.config, num_blocks, block_size, self.dtype,
                                                           self.device)

    def prepare(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                                   list[Sequence], list[int]]:
        """input_ids, positions, metadata, the sequences that sample and the indices (into the packed
        tokens) of their last tokens."""
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu_seqlens = [0]
        sampling: list[Sequence] = []
        sample_index: list[int] = []
        for seq, n in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids(start, end)
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            seq_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + n)
            if end == seq.num_tokens:
                sampling.append(seq)
                sample_index.append(cu_seqlens[-1] - 1)
        width = max(len(seq.block_table) for seq, _ in batch)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in batch]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            cu_seqlens_q=tensor(cu_seqlens, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            max_seqlen_q=max(n for _, n in batch),
            is_decode=all(n == 1 for _, n in batch),
        )
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta, sampling, sample_index

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Run the step: the sequences that sample, in batch order, and their fp32 logits `[len, vocab]`."""
        input_ids, positions, meta, sampling, sample_index = self.prepare(batch)
        forward = self.model.forward
        if meta.is_decode:
            forward = self.decode_forward
            # One compiled graph for every block-table width, and one for every batch size above 1.
            torch._dynamo.maybe_mark_dynamic(meta.block_tables, 1)
            if len(batch) > 1:
                for t in (input_ids, positions, meta.seq_lens, meta.slot_mapping, meta.cu_seqlens_q):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(meta.block_tables, 0)
        hidden = forward(input_ids, positions, meta, self.kv_caches)
        if not sample_index:
            return sampling, torch.empty(0, self.model.config.vocab_size, dtype=torch.float32, device=self.device)
        last = torch.tensor(sample_index, dtype=torch.int64).to(self.device)
        return sampling, self.model.compute_logits(hidden[last]).float()
