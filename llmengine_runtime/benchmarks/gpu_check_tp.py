"""gpu_check's tensor-parallel case: N ranks (one GPU each, NCCL) against one rank on the same random checkpoint.

A two-layer checkpoint at llama-3-1-8b-instruct's shapes (32 query heads, 8 KV groups: whole groups per rank),
greedy, fp32 activations so that the comparison is tight; the same token ids must come out of both. With fewer
than N GPUs the case is skipped and says so. On CPU (gloo) it runs the same way, which is how it is tested here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from llmengine_runtime.benchmarks.random_model import make_random_checkpoint, random_config

PROMPTS = [[1] + [(13 * i + 7) % 400 + 100 for i in range(n)] for n in (5, 40, 130)]  # ids < 500


def check_tensor_parallel(device: str = "cuda", world_size: int = 2, max_new_tokens: int = 24,
                          overrides: dict | None = None) -> dict:
    """{"ok", "skipped", "detail"}: greedy tokens of `world_size` ranks equal one rank's on every prompt
    (`overrides`: config fields to change, e.g. smaller shapes for a CPU run)."""
    if device == "cuda" and torch.cuda.device_count() < world_size:
        return {"ok": True, "skipped": True,
                "detail": f"tensor parallelism: skipped ({torch.cuda.device_count()} GPU(s), {world_size} needed)"}
    from llmengine_runtime.runtime import LLM, SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    config = random_config("llama-3-1-8b-instruct", num_layers=2, overrides={"vocab_size": 8192, **(overrides or {})})
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_random_checkpoint(config, Path(tmp) / "ckpt", dtype=torch.float32)
        outputs = []
        for size in (1, world_size):
            llm = LLM(folder, dtype="float32", device=device, tensor_parallel_size=size, kv_cache_gib=0.25)
            outputs.append([r.token_ids for r in llm.generate(PROMPTS, params, progress=False)])
            llm.engine.close()
            del llm
    same = sum(a == b for a, b in zip(*outputs))
    return {"ok": same == len(PROMPTS), "skipped": False,
            "detail": f"tensor parallelism ({device}, {world_size} ranks vs 1): greedy tokens equal on "
                      f"{same}/{len(PROMPTS)} prompts"}
