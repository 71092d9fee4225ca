"""The tests' reference generate loop over the paged-KV forward pass, with no scheduler: the runtime's
engine does this properly (and `llmengine generate` runs through it).

Each sequence owns a fixed run of cache blocks; step one prefills all prompts packed together, then every
step decodes one token per unfinished sequence.
"""

from __future__ import annotations

import torch

from llmengine_runtime.models.attention import AttentionMetadata, allocate_kv_caches
from llmengine_runtime.models.causal_lm import CausalLM


def _slots(block_tables: torch.Tensor, seq: int, positions: range, block_size: int) -> list[int]:
    return [int(block_tables[seq, p // block_size]) * block_size + p % block_size for p in positions]


@torch.inference_mode()
def generate(model: CausalLM, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             stop_token_ids: set[int] | None = None, block_size: int = 16,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """New token ids for each prompt: greedy at temperature 0, else sampled from softmax(logits / T)."""
    device = model.embed.weight.device
    stop = stop_token_ids or set()
    blocks_per_seq = -(-(max(map(len, prompts)) + max_new_tokens) // block_size)
    kv_caches = allocate_kv_caches(model.config, blocks_per_seq * len(prompts), block_size, model.embed.weight.dtype,
                                   device)
    block_tables = torch.arange(blocks_per_seq * len(prompts), dtype=torch.int32).view(len(prompts), -1)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    lengths = [len(p) for p in prompts]
    # prefill: all prompts packed
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    positions = torch.tensor([i for p in prompts for i in range(len(p))], device=device)
    slots = [s for i, p in enumerate(prompts) for s in _slots(block_tables, i, range(len(p)), block_size)]
    meta = AttentionMetadata.for_prompts(lengths, device)
    meta.slot_mapping = torch.tensor(slots, device=device)
    meta.block_tables = block_tables.to(device)
    last = (meta.cu_seqlens_q[1:] - 1).long()
    while True:
        hidden = model(ids, positions, meta, kv_caches)
        logits = model.compute_logits(hidden[last]).float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
        else:
            next_ids = logits.argmax(-1).tolist()
        still = []
        for seq, token in zip(active, next_ids):
            outputs[seq].append(token)
            if token not in stop and len(outputs[seq]) < max_new_tokens:
                still.append(seq)
        active = still
        if not active:
            return outputs
        ids = torch.tensor([outputs[s][-1] for s in active], device=device)
        positions = torch.tensor([lengths[s] + len(outputs[s]) - 1 for s in active], device=device)
        seq_lens = [lengths[s] + len(outputs[s]) for s in active]
        meta = AttentionMetadata(
            cu_seqlens_q=torch.arange(len(active) + 1, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor([_slots(block_tables, s, range(n - 1, n), block_size)[0]
                                       for s, n in zip(active, seq_lens)], device=device),
            block_tables=block_tables[active].to(device), max_seqlen_q=1, is_decode=True)
        last = torch.arange(len(active), device=device)
