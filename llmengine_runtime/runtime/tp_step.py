"""One forward step's inputs, sent from rank 0 to the tensor-parallel workers: a small header, then one broadcast.

Rank 0 writes the header (the sizes) to each worker's pipe, which is also what wakes an idle worker: it waits on
its pipe, never in a collective, so an idle engine has no collective that could time out. Then every rank joins
one broadcast of a packed int64 tensor: input ids, positions, slot mapping, cu_seqlens_q, seq_lens and the block
tables, in that order (the AttentionMetadata contract of models/attention.py).
"""

from __future__ import annotations

import struct

import torch
import torch.distributed as dist

from llmengine_runtime.models.attention import AttentionMetadata

HEADER = struct.Struct("<6q")  # num_tokens, num_seqs, table width, max_seqlen_q, is_decode, spare
STOP = b"stop"  # a worker leaves its loop on this message instead of a header


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died, hung past the collective timeout, or the ranks fell out of step: the
    engine cannot run another step."""


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> tuple[bytes, torch.Tensor]:
    """The header and the packed int64 payload of a step."""
    num_seqs, width = meta.block_tables.shape
    header = HEADER.pack(input_ids.numel(), num_seqs, width, meta.max_seqlen_q, int(meta.is_decode), 0)
    parts = (input_ids, positions, meta.slot_mapping, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables.reshape(-1))
    return header, torch.cat([p.to(torch.int64) for p in parts])


def payload_size(header: bytes) -> int:
    num_tokens, num_seqs, width, _, _, _ = HEADER.unpack(header)
    return 3 * num_tokens + (num_seqs + 1) + num_seqs + num_seqs * width


def unpack_step(header: bytes, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """input_ids, positions and metadata from a header and its payload (on the rank's device)."""
    num_tokens, num_seqs, width, max_seqlen_q, is_decode, _ = HEADER.unpack(header)
    sizes = [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * width]
    input_ids, positions, slots, cu_seqlens, seq_lens, tables = payload.split(sizes)
    meta = AttentionMetadata(cu_seqlens_q=cu_seqlens.to(torch.int32), seq_lens=seq_lens.to(torch.int32),
                             slot_mapping=slots, block_tables=tables.to(torch.int32).view(num_seqs, width),
                             max_seqlen_q=max_seqlen_q, is_decode=bool(is_decode))
    return input_ids, positions, meta


def broadcast_payload(payload: torch.Tensor) -> torch.Tensor:
    """Rank 0's payload to every rank (in place: workers pass an empty tensor of the header's size)."""
    dist.broadcast(payload, src=0)
    return payload
