"""The choices an Engine makes before any request (its compute dtype, its KV cache's type, how many KV blocks fit
the budget), and the checks a request's prompt must pass before it gets a sequence."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmengine_runtime.models.config import ModelConfig
from llmengine_runtime.models.float_linear import FloatLinear
from llmengine_runtime.models.gguf_linear import GGUFLinear
from llmengine_runtime.models.loader import DTYPES, parse_dtype
from llmengine_runtime.models.quantized_linear import QuantizedLinear
from llmengine_runtime.models.tokenizer import TOKENIZER_FILES, Tokenizer
from llmengine_runtime.runtime.block_manager import num_blocks_for_budget
from llmengine_runtime.runtime.params import SamplingParams

KV_CACHE_DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device, quantized: bool,
                           tensor_parallel: bool = False) -> torch.dtype:
    """The KV cache's element type for `kv_cache_dtype=name`. "auto": fp16 for an fp32 model with quantized
    weights on the CPU (attention then reads half the bytes a step; llama.cpp's default cache type too), the
    model's dtype otherwise. A type other than the model's is a CPU option of one process (the GPU kernels and
    tensor-parallel workers keep the model's)."""
    if name not in KV_CACHE_DTYPE_NAMES:
        raise ValueError(f"kv_cache_dtype={name!r} is not accepted: one of {', '.join(KV_CACHE_DTYPE_NAMES)}")
    if name == "auto":
        cpu_quantized = device.type == "cpu" and quantized and model_dtype == torch.float32 and not tensor_parallel
        return torch.float16 if cpu_quantized else model_dtype
    dtype = getattr(torch, name)
    if dtype != model_dtype and (device.type != "cpu" or tensor_parallel):
        raise ValueError(f"kv_cache_dtype={name!r} differs from the model's {str(model_dtype).removeprefix('torch.')}:"
                         " accepted only on the CPU without tensor parallelism; use 'auto' there")
    return dtype


def compute_dtype(dtype: str, device: torch.device, config: ModelConfig) -> torch.dtype:
    """`dtype`, or for "auto": fp32 on CPU (exact, and fast there); the checkpoint's dtype on a GPU (bf16 if it
    names none we run)."""
    if dtype == "auto":
        dtype = "float32" if device.type != "cuda" else \
            config.torch_dtype if config.torch_dtype in DTYPES else "bfloat16"
    return parse_dtype(dtype)


def kv_cache_plan(model: nn.Module, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                  kv_cache_dtype: str, block_size: int, kv_cache_gib: float | None, gpu_memory_utilization: float,
                  max_num_batched_tokens: int, max_num_seqs: int, tensor_parallel: bool) -> tuple[torch.dtype, int]:
    """(the KV cache's element type, the number of blocks) for a loaded model."""
    # Room for one step's activations and logits, kept out of the GPU budget.
    element = model.embed.weight.element_size()
    reserve = max_num_batched_tokens * element * 4 * (config.hidden_size * 4 + config.intermediate_size * 2) \
        + max_num_seqs * config.vocab_size * 4 * 4
    layers = {type(m) for m in model.modules()}
    quantized = bool(layers & {QuantizedLinear, GGUFLinear, FloatLinear})  # a GGUF's too
    if FloatLinear in layers:
        dtype = torch.float32  # bf16/fp16 weights, fp32 activations (models/float_linear.py)
    cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype, device, quantized, tensor_parallel)
    # Under tensor parallelism the budget counts blocks as if one rank held every KV head (each holds its share),
    # so N ranks schedule exactly what one would.
    return cache_dtype, num_blocks_for_budget(config, cache_dtype, block_size, device, kv_cache_gib,
                                              gpu_memory_utilization, reserve)


def checked_prompt_ids(prompt: str | list[int], params: SamplingParams, tokenizer: Tokenizer | None, model_dir: Path,
                       vocab_size: int, max_model_len: int, cache_tokens: int) -> list[int]:
    """The prompt's token ids (a string encoded by the model's tokenizer; only its last
    `params.truncate_prompt_tokens`, if set); ValueError naming what is wrong for
    an empty prompt, ids outside the vocabulary, text or stop strings without a tokenizer, or a prompt plus
    max_new_tokens longer than the model or the KV cache holds."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): "
                             "give the prompt as token ids")
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        prompt_ids = [int(t) for t in prompt]
        bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if not prompt_ids:
        raise ValueError("prompt is empty (0 tokens)")
    if params.truncate_prompt_tokens is not None:  # vLLM's: keep the last N tokens
        prompt_ids = prompt_ids[-params.truncate_prompt_tokens:]
    if params.stop_sequences and tokenizer is None:
        raise ValueError("stop_sequences need a tokenizer; this model folder has none")
    total = len(prompt_ids) + params.max_new_tokens
    if total > max_model_len:
        limit = f"the KV cache holds {cache_tokens} tokens" if max_model_len == cache_tokens \
            else f"max_model_len is {max_model_len}"
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                         f"{total} tokens, but {limit}")
    return prompt_ids


def resolve_model_dir(model: str | Path) -> Path:
    """A model folder, or a name the model zoo knows."""
    from llmengine_runtime.models.zoo import resolve_model

    return Path(resolve_model(model))
