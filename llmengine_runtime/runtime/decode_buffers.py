"""The inputs and outputs of a decode step (one new token per sequence) in tensors kept from step to step.

The one-call CPU decode step with its head (models/fused_decode.py) binds these tensors once, reads the first
`rows` rows of the inputs at each step and writes the logits of those rows, and their argmax, in place. `fill`
writes the inputs through numpy views of the same memory. So a step makes no tensor and passes none: on this CPU
each tensor made from Python costs ~3 us and each one passed to a TorchScript method ~1.5 us, 10-20 times that
after the step's weight stream has left the interpreter's code and data cold (the C++ step is called through ctypes
instead: kernels/cpu/decoder.cpp).
The layouts are the AttentionMetadata contract's (models/attention.py); rows past `rows` and block-table entries
past a sequence's blocks hold stale values that the step never reads. The tensors grow (and `version` changes, so
that the decoder binds them again) when a batch needs more rows or a longer block table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmengine_runtime.runtime.model_runner import Chunk


class DecodeBuffers:
    def __init__(self, vocab_size: int, rows: int = 8, width: int = 32):
        self.vocab_size = vocab_size
        self.rows = 0  # rows filled by the last `fill`
        self.version = 0
        self._allocate(rows, width)

    def _allocate(self, rows: int, width: int) -> None:
        self.input_ids = torch.zeros(rows, dtype=torch.int64)
        self.positions = torch.zeros(rows, dtype=torch.int64)
        self.slot_mapping = torch.zeros(rows, dtype=torch.int64)
        self.block_tables = torch.zeros(rows, width, dtype=torch.int32)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32)
        self.logits = torch.zeros(rows, self.vocab_size, dtype=torch.float32)
        self.tokens = torch.zeros(rows, dtype=torch.int64)
        self._views = (self.input_ids.numpy(), self.positions.numpy(), self.slot_mapping.numpy(),
                       self.block_tables.numpy(), self.seq_lens.numpy())
        self._tokens = self.tokens.numpy()
        self._logits_rows: dict[int, torch.Tensor] = {}  # (views made once per row count: a slice costs ~3 us)
        self.version += 1

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The inputs: input_ids, positions, slot_mapping, block_tables, seq_lens (LlamaDecoder.bind_buffers takes
        them, then the rotary table, then `outputs()`)."""
        return self.input_ids, self.positions, self.slot_mapping, self.block_tables, self.seq_lens

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs: logits `[rows, vocab]` and the argmax of each row."""
        return self.logits, self.tokens

    def fill(self, chunks: list[Chunk], block_size: int) -> int:
        """Write one-token chunks into the first rows; returns their number."""
        rows, width = self.block_tables.shape
        if len(chunks) > rows or any(len(chunk.block_table) > width for chunk in chunks):
            self._allocate(max(len(chunks), 2 * rows), max(width, 2 * max(len(c.block_table) for c in chunks)))
        ids, positions, slots, tables, lens = self._views
        for i, chunk in enumerate(chunks):
            position, table = chunk.start, chunk.block_table
            ids[i] = chunk.token_ids[0]
            positions[i] = position
            slots[i] = table[position // block_size] * block_size + position % block_size
            lens[i] = position + 1
            tables[i, :len(table)] = table
        self.rows = len(chunks)
        return self.rows

    def step_logits(self) -> torch.Tensor:
        """The last step's logits `[rows, vocab]`: a view that the next step overwrites."""
        view = self._logits_rows.get(self.rows)
        if view is None:
            view = self._logits_rows[self.rows] = self.logits[:self.rows]
        return view

    def step_argmax(self) -> list[int]:
        """The last step's argmax of each logits row (when the step was asked for it)."""
        return self._tokens[:self.rows].tolist()
