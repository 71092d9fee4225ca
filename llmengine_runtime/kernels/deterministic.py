"""The `--deterministic` switch (Engine(deterministic=True), `llmengine serve --deterministic`): batch-invariant
Triton paths on CUDA, at some cost in speed.

With it on, a row's numbers do not depend on the other rows of the step, on how many there are, or on whether the
row came in a prompt, a prompt chunk or a decode step:
- float linear layers run deterministic_matmul.py's product (fixed tiles, no split-K: each output tile is one
  program reducing K from 0 upward) instead of cuBLAS, whose kernel and split choices follow M;
- quantized linear layers (quant_matmul.py) always take the tiled program with one fixed BLOCK_M (by default
  rows <= 4 take a GEMV-shaped program and BLOCK_M grows with M);
- attention of every row, decode or prompt, runs the split-KV kernel of decode_attention.py with a fixed number
  of keys per split (deterministic_attention.py), the splits merged one after another in order: the default
  decode path picks its split count from the batch size, and prompts take another kernel (prefill_attention.py)
  with another reduction order;
- RMSNorm, rotary and the sampler's log-softmax and argmax already reduce each row alone.

On the CPU the switch changes nothing: our C++ kernels keep these invariants always. Float-weight products there
(torch's F.linear through MKL/oneDNN) stay batch-variant (README, "Same request, same text").

The switch is process-wide and lives in the environment, so tensor-parallel workers started after it inherit it.
"""

from __future__ import annotations

import os

ENV = "LLMENGINE_DETERMINISTIC"
_on = os.environ.get(ENV, "0") == "1"  # a plain global: torch.compile guards on it without reading the environment


def set_deterministic(on: bool) -> None:
    """Turn the batch-invariant Triton paths on or off for this process (and processes it starts later)."""
    global _on
    _on = bool(on)
    os.environ[ENV] = "1" if on else "0"


def deterministic() -> bool:
    return _on
