"""The one definition of a greedy row's token and log-prob, used wherever one is taken (the sampler, alone or in a
mixed batch, and speculative verification), so that a greedy request gets the same numbers in any batch and with or
without speculation: the first maximum of the row (as torch.argmax) and `x[t] - logsumexp(x)`.

On the CPU (fp32 rows) kernels/cpu/sampling.cpp's greedy_sample computes both, each row on its own in a fixed order
(its vocabulary in fixed chunks, summed in order): a row's numbers do not depend on the other rows or the threads."""

from __future__ import annotations

import torch

from llmengine_runtime.kernels import cpu as cpu_kernels


def greedy_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits `[B, V]` -> (argmax int64 `[B]`, its log-prob fp32 `[B]`)."""
    if cpu_kernels.cpu_logits(logits):
        return torch.ops.llmengine_cpu.greedy_sample(logits, True)
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    return tokens, logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
