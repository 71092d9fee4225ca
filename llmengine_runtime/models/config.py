"""Model configuration read from a Hugging Face config.json (Llama and Falcon families)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA_ARCHITECTURES = {"LlamaForCausalLM"}
FALCON_ARCHITECTURES = {"FalconForCausalLM", "RWForCausalLM"}
FALCON_MODEL_TYPES = {"falcon", "RefinedWebModel", "RefinedWeb"}
ROPE_TYPES = {"default", "linear", "dynamic", "llama3"}


class ConfigError(ValueError):
    """A config.json this runtime cannot serve; the message names the field and what is accepted."""


@dataclass
class ModelConfig:
    arch: str  # "llama" or "falcon"
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
    attention_bias: bool = False  # llama q/k/v/o biases
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


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
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


def _eos(raw: dict[str, Any]) -> list[int]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


def _dtype(raw: dict[str, Any]) -> str:
    return str(raw.get("torch_dtype") or raw.get("dtype") or "float32")


def _llama(raw: dict[str, Any]) -> ModelConfig:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported hidden_act {act!r} for LlamaForCausalLM; supported: 'silu'")
    if raw.get("pretraining_tp", 1) != 1:
        raise ConfigError("unsupported pretraining_tp != 1; supported: 1")
    num_heads = raw["num_attention_heads"]
    theta, scaling = _rope(raw)
    return ModelConfig(
        arch="llama",
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=raw.get("attention_bias", False),
        mlp_bias=raw.get("mlp_bias", False),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=_eos(raw),
        torch_dtype=_dtype(raw),
    )


def _falcon(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type", "falcon")
    num_heads = raw.get("num_attention_heads") or raw.get("n_head")
    num_layers = raw.get("num_hidden_layers") or raw.get("n_layer")
    new_arch = raw.get("new_decoder_architecture", model_type == "RefinedWeb")
    multi_query = raw.get("multi_query", True)
    if new_arch:
        num_kv_heads = raw.get("num_kv_heads") or raw.get("n_head_kv") or num_heads
    elif multi_query:
        num_kv_heads = 1
    else:
        num_kv_heads = num_heads
    hidden = raw["hidden_size"]
    act = raw.get("activation", "gelu")
    if act != "gelu":
        raise ConfigError(f"unsupported activation {act!r} for Falcon; supported: 'gelu'")
    alibi = raw.get("alibi", False)
    theta, scaling = _rope(raw)
    num_ln = raw.get("num_ln_in_parallel_attn")
    return ModelConfig(
        arch="falcon",
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw.get("ffn_hidden_size") or 4 * hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=raw.get("head_dim") or hidden // num_heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        use_rope=not alibi,
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        parallel_attn=raw.get("parallel_attn", True),
        new_decoder_architecture=new_arch,
        num_ln_in_parallel_attn=2 if num_ln is None else int(num_ln),
        multi_query=multi_query,
        alibi=alibi,
        bias=raw.get("bias", False),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=_eos(raw),
        torch_dtype=_dtype(raw),
    )


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from the dict of an HF config.json; unsupported models raise ConfigError."""
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if set(architectures) & LLAMA_ARCHITECTURES or (not architectures and model_type == "llama"):
        return _llama(raw)
    if set(architectures) & FALCON_ARCHITECTURES or (not architectures and model_type in FALCON_MODEL_TYPES):
        return _falcon(raw)
    supported = sorted(LLAMA_ARCHITECTURES | FALCON_ARCHITECTURES)
    raise ConfigError(f"unsupported architecture {architectures or model_type!r}; supported: {supported}")


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}")
    return parse_config(json.loads(path.read_text()))
