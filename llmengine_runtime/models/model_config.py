"""ModelConfig, what every module of a model reads, and the helpers the families parse config.json with.

A leaf: the families (models/families.py) build ModelConfigs, and models/config.py hands a config.json to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROPE_TYPES = {"default", "linear", "dynamic", "llama3"}


class ConfigError(ValueError):
    """A config.json this runtime cannot serve; the message names the field and what is accepted."""


@dataclass
class ModelConfig:
    arch: str  # the family's name (models/families.py): "llama", "falcon", "mistral", "qwen2", "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    use_rope: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama-style q/k/v biases
    attention_out_bias: bool = False  # o_proj's bias (Llama: as attention_bias; Qwen2: none)
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head (weights [head_dim]) before rotary
    # Sliding-window attention per layer: a query at position p sees keys p - W + 1 .. p (0: every earlier key).
    # Empty: no layer has a window.
    layer_windows: tuple[int, ...] = ()
    mlp_bias: bool = False  # llama gate/up/down biases
    # Falcon graph flags (docs/architecture.md, "Model variants")
    parallel_attn: bool = False
    new_decoder_architecture: bool = False
    num_ln_in_parallel_attn: int = 2
    multi_query: bool = False
    alibi: bool = False
    bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def window(self, layer: int) -> int:
        """Layer `layer`'s sliding window (0: none)."""
        return self.layer_windows[layer] if self.layer_windows else 0


def rope_settings(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Theta and scaling from `rope_theta` + `rope_scaling` (with `type` or `rope_type`) or `rope_parameters`."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if params and not scaling and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    theta = float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("rope_theta", None)
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unsupported rope scaling type {rope_type!r}; supported: {sorted(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if "factor" not in scaling:
        raise ConfigError(f"rope scaling {rope_type!r} needs a 'factor'")
    return theta, {"rope_type": rope_type, **scaling}


def eos_ids(raw: dict[str, Any]) -> list[int]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


def dtype_name(raw: dict[str, Any]) -> str:
    return str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
