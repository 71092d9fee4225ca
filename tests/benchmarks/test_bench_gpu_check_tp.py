"""gpu_check's tensor-parallel case, run here on CPU with gloo (on a GPU machine it runs on NCCL)."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.benchmarks.gpu_check_tp import check_tensor_parallel

SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4,
         "vocab_size": 512}


@pytest.mark.slow  # spawns a worker process
def test_two_ranks_give_one_ranks_tokens_on_cpu():
    result = check_tensor_parallel("cpu", 2, max_new_tokens=8, overrides=SMALL)
    assert result == {"ok": True, "skipped": False,
                      "detail": "tensor parallelism (cpu, 2 ranks vs 1): greedy tokens equal on 3/3 prompts"}


def test_skipped_without_enough_gpus():
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: the case runs for real")
    result = check_tensor_parallel("cuda", 2)
    assert result["ok"] and result["skipped"] and "skipped" in result["detail"]
