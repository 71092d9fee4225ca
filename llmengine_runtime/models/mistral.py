"""Mistral: Llama plus sliding-window attention (`sliding_window`: a query at position p sees keys p - W + 1 .. p in
every layer; null: none, as Mistral v0.2 and later). Its GGUFs are llama.cpp "llama" files (q/k rows permuted);
models/families.py's gguf_family tells them apart by `llama.attention.sliding_window` or a Mistral `general.name`.
"""

from __future__ import annotations

from typing import Any

from llmengine_runtime.models.family_entry import Family, GGUFNames
from llmengine_runtime.models.layers import RMSNorm
from llmengine_runtime.models.llama import LlamaBlock, llama_targets, parse_llama
from llmengine_runtime.models.model_config import ConfigError, ModelConfig


def window_size(raw: dict[str, Any], key: str = "sliding_window") -> int:
    """A config.json's sliding window as a positive int, 0 for none (null or absent)."""
    window = raw.get(key)
    if window is None:
        return 0
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"{key} must be a positive integer or null, got {window!r}")
    return window


def parse_mistral(raw: dict[str, Any]) -> ModelConfig:
    if raw.get("layer_types"):
        raise ConfigError("layer_types is not supported for MistralForCausalLM (alternating attention is "
                          "Ministral's); supported: one sliding_window for every layer")
    window = window_size(raw)
    return parse_llama(raw, "mistral", layer_windows=(window,) * raw["num_hidden_layers"] if window else ())


def gguf_extra_config(meta: dict, tensor_names: set[str]) -> dict[str, Any]:
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "sliding_window": meta.get("llama.attention.sliding_window")}


FAMILY = Family("mistral", frozenset({"MistralForCausalLM"}), frozenset({"mistral"}), parse_mistral, LlamaBlock,
                RMSNorm, llama_targets, GGUFNames("llama", permuted_rotary=True, extra_config=gguf_extra_config))
