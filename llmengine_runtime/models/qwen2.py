"""Qwen2 / Qwen2.5: Llama with biases on q, k and v but none on o_proj (always, whatever `attention_bias` says).

Sliding windows are honoured as transformers applies them: with `use_sliding_window: true`, the layers that
`layer_types` marks "sliding_attention" (by default those from `max_window_layers` on) see their last
`sliding_window` keys; without it no layer has a window. GGUF (`general.architecture` "qwen2"): llama.cpp keeps HF's
q/k row order (NeoX rope) and stores the biases as `blk.N.attn_{q,k,v}.bias`.
"""

from __future__ import annotations

from typing import Any

from llmengine_runtime.models.family_entry import Family, GGUFNames
from llmengine_runtime.models.layers import RMSNorm
from llmengine_runtime.models.llama import LlamaBlock, llama_targets, parse_llama
from llmengine_runtime.models.mistral import window_size
from llmengine_runtime.models.model_config import ConfigError, ModelConfig

LAYER_TYPES = {"full_attention", "sliding_attention"}


def qwen_layer_windows(raw: dict[str, Any]) -> tuple[int, ...]:
    """Each layer's window (transformers' Qwen2Config/Qwen3Config rules); () when none has one."""
    layers = raw["num_hidden_layers"]
    window = window_size(raw) if raw.get("use_sliding_window", False) else 0
    if not window:
        return ()
    types = raw.get("layer_types")
    if types is None:
        first = raw.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if len(types) != layers or not set(types) <= LAYER_TYPES:
        raise ConfigError(f"layer_types must list one of {sorted(LAYER_TYPES)} per layer ({layers}), got {types!r}")
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def parse_qwen2(raw: dict[str, Any]) -> ModelConfig:
    return parse_llama(raw, "qwen2", attention_bias=True, attention_out_bias=False,
                       layer_windows=qwen_layer_windows(raw))


def gguf_extra_config(meta: dict, tensor_names: set[str]) -> dict[str, Any]:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


FAMILY = Family("qwen2", frozenset({"Qwen2ForCausalLM"}), frozenset({"qwen2"}), parse_qwen2, LlamaBlock, RMSNorm,
                llama_targets, GGUFNames("qwen2", permuted_rotary=False, extra_config=gguf_extra_config))
