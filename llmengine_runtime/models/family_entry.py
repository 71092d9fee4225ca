"""What a model family's entry holds (models/families.py keeps the registry of them; each family file makes its own)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from llmengine_runtime.models.model_config import ModelConfig
from llmengine_runtime.models.weights import ParamTarget


@dataclass(frozen=True)
class GGUFNames:
    """How a GGUF of this family reads: its `general.architecture`, whether llama.cpp's converter interleaved the
    q/k rows of each head for its rotate-adjacent rope (only "llama" files: qwen2/qwen3 use NeoX rope and keep HF's
    order), the llama.cpp tensor names (after `blk.{i}.`) beyond Llama's, and the config.json fields its metadata
    adds to Llama's (`extra_config(meta, tensor_names)`)."""

    architecture: str
    permuted_rotary: bool
    layer_names: dict[str, str] = field(default_factory=dict)
    extra_config: Callable[[dict, set[str]], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.arch
    architectures: frozenset[str]  # config.json "architectures"
    model_types: frozenset[str]  # config.json "model_type", when it lists no architectures
    parse: Callable[[dict[str, Any]], ModelConfig]
    block: Callable[[ModelConfig, int], nn.Module]  # (config, layer index) -> one decoder block
    final_norm: Callable[[int, float], nn.Module]  # (hidden, eps)
    targets: Callable[[nn.Module, ModelConfig], dict[str, ParamTarget]]  # HF name -> where it lands
    gguf: GGUFNames | None = None
