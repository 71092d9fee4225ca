"""How a step runs, chosen once when the runner is built: `make_executor`.

Each executor has one entry, `run(chunks, buffers) -> StepResult`: the step's inputs are already in `buffers`
(runtime/step.py), filled by the executor in the layout it needs.
- `EagerExecutor`: the model's forward, one torch op (or C++/Triton kernel) at a time, then the head
  (`compute_logits`) on the rows whose logits are wanted; decode steps through torch.compile with `--compile`; under
  tensor parallelism each step's inputs go to the workers first (runtime/tp_worker.py).
- `CpuStepExecutor`: our C++ step with its head (models/fused_decode.py), on buffers bound once, for any step:
  decode rows, prompt chunks and speculative verification rows side by side; it takes each logits row's argmax on
  the way. Steps that score prompt positions (which need every position's hidden state) go through the eager
  executor, over the same KV caches and the same C++ kernels, so a row's numbers do not depend on which of the two
  ran it (tests/runtime/test_batch_invariance.py). Without a head on our kernels, it runs decode steps through the
  C++ step and the head in torch, the rest eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from llmengine_runtime.models.attention import AttentionMetadata, KVCache
from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.models.fused_decode import FusedDecode
from llmengine_runtime.runtime.log_probs import Scores, score_positions
from llmengine_runtime.runtime.step import Chunk, StepBuffers, is_decode, scores_prompt
from llmengine_runtime.runtime.tp_step import TensorParallelError


class StepSender(Protocol):
    """Rank 0's handle on its tensor-parallel workers (runtime/tp_worker.py's TPWorkers)."""

    def send_step(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None: ...

    def error(self, e: BaseException) -> TensorParallelError: ...


@dataclass
class StepResult:
    """fp32 logits `[sum(num_logits), vocab]`, chunk after chunk; per chunk the log-probs, ranks and top-N of its
    `score_targets`; each logits row's argmax when the step took it on the way, else None. The C++ step's logits
    are a view of its buffers, which the next step overwrites."""

    logits: torch.Tensor
    scores: list[Scores]
    argmax: list[int] | None = None


class EagerExecutor:
    def __init__(self, model: CausalLM, kv_caches: list[KVCache], compile_decode: bool = False,
                 workers: StepSender | None = None):
        self.model, self.kv_caches, self.workers = model, kv_caches, workers
        # Decode steps have one shape family (one token per sequence): torch.compile fuses their many small ops
        # (norms, rotary, cache writes, masks) into a few kernels, which on CPU is most of the time outside the
        # matrix products. Prefill chunks (and speculating sequences) stay eager.
        self.decode_forward = torch.compile(model.forward, dynamic=True) if compile_decode else model.forward
        self.device = model.embed.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's forward over the cache: hidden states `[num_tokens, hidden]` (decode steps compiled)."""
        forward = self.model.forward
        if meta.is_decode and self.decode_forward is not forward:
            forward = self.decode_forward
            # One compiled graph for every block-table width, and one for every batch size above 1.
            torch._dynamo.maybe_mark_dynamic(meta.block_tables, 1)
            if meta.seq_lens.numel() > 1:
                for t in (input_ids, positions, meta.seq_lens, meta.slot_mapping, meta.cu_seqlens_q):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(meta.block_tables, 0)
        return forward(input_ids, positions, meta, self.kv_caches)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], buffers: StepBuffers, block_size: int) -> StepResult:
        buffers.fill(chunks, block_size)
        input_ids, positions, meta = buffers.inputs()
        if self.workers is None:
            hidden = self.forward(input_ids, positions, meta)
        else:  # every rank runs this forward; a failure leaves the ranks out of step, so it ends the group
            try:
                self.workers.send_step(input_ids, positions, meta)
                hidden = self.forward(input_ids, positions, meta)
            except TensorParallelError:
                raise
            except Exception as e:
                raise self.workers.error(e) from e
        scores = self.score(chunks, hidden)
        logit_index = buffers.logit_index
        if not logit_index:
            return StepResult(torch.empty(0, self.model.config.vocab_size, dtype=torch.float32, device=self.device),
                              scores)
        if len(logit_index) < hidden.shape[0]:  # (increasing indices: as many as rows means every row, in order)
            hidden = hidden[torch.tensor(logit_index, dtype=torch.int64).to(self.device)]
        return StepResult(self.model.compute_logits(hidden).float(), scores)

    def score(self, chunks: list[Chunk], hidden: torch.Tensor) -> list[Scores]:
        """The chunks' prompt scores from the packed hidden states, all chunks' positions in one pass."""
        none: list[Scores] = [([], [], []) for _ in chunks]
        if not any(chunk.score_targets for chunk in chunks):
            return none
        rows: list[int] = []
        targets: list[int] = []
        ns: list[int] = []
        offset = 0
        for chunk in chunks:
            first = offset + chunk.score_from
            rows += range(first, first + len(chunk.score_targets))
            targets += chunk.score_targets
            ns += [chunk.score_top] * len(chunk.score_targets)
            offset += len(chunk.token_ids)
        log_probs, ranks, tops = score_positions(self.model, hidden[torch.tensor(rows).to(self.device)], targets, ns)
        scores: list[Scores] = []
        at = 0
        for chunk in chunks:
            m = len(chunk.score_targets)
            scores.append((log_probs[at:at + m], ranks[at:at + m], tops[at:at + m]))
            at += m
        return scores


class CpuStepExecutor:
    def __init__(self, eager: EagerExecutor, fused: FusedDecode):
        self.eager, self.fused = eager, fused
        self.kv_caches = eager.kv_caches
        self.head_buffers = StepBuffers(fused.head_rows) if fused.has_head else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states of a step: decode steps through the C++ step (without its head), the rest eager."""
        if meta.is_decode:
            return self.fused(input_ids, positions, meta, self.kv_caches)
        return self.eager.forward(input_ids, positions, meta)

    def run(self, chunks: list[Chunk], buffers: StepBuffers, block_size: int) -> StepResult:
        if scores_prompt(chunks) or (self.head_buffers is None and not is_decode(chunks)):
            return self.eager.run(chunks, buffers, block_size)
        if self.head_buffers is None:  # a head outside our kernels: the step's hidden states, then compute_logits
            with torch.inference_mode():
                buffers.fill(chunks, block_size)
                input_ids, positions, meta = buffers.inputs()
                hidden = self.fused(input_ids, positions, meta, self.kv_caches)
                return StepResult(self.eager.model.compute_logits(hidden).float(), [([], [], [])] * len(chunks))
        # (Outside inference mode, which costs ~80 us cold: no tensor is made on the way.)
        step = self.head_buffers
        step.fill(chunks, block_size, bound=True)
        self.fused.step_buffers(step, self.kv_caches, argmax=True)
        argmax = step.step_argmax() if step.logit_index else None
        return StepResult(step.step_logits(), [([], [], [])] * len(chunks), argmax)


def make_executor(model: CausalLM, kv_caches: list[KVCache], compile_decode: bool = False,
                  workers: StepSender | None = None) -> EagerExecutor | CpuStepExecutor:
    """The C++ step where it applies (models/fused_decode.py: a quantized Llama on our CPU kernels, one process),
    else eager (compiled decode steps with `compile_decode`)."""
    eager = EagerExecutor(model, kv_caches, compile_decode, workers)
    if workers is not None:
        return eager
    fused = FusedDecode.build(model)
    if fused is None or not fused.applies(kv_caches):
        return eager
    return CpuStepExecutor(eager, fused)
