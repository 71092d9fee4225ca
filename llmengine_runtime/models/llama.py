"""Llama: the decoder block (pre-norm, RMSNorm fused with the residual add), its config.json and checkpoint names.

Mistral, Qwen2 and Qwen3 are this block with flags of the config (a sliding window, q/k/v biases without an o_proj
bias, per-head q/k norms: models/layers.py's Attention), so their files add only what differs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmengine_runtime.models.attention import AttentionMetadata, KVCache
from llmengine_runtime.models.family_entry import Family, GGUFNames
from llmengine_runtime.models.layers import Attention, GatedMLP, RMSNorm
from llmengine_runtime.models.model_config import ConfigError, ModelConfig, dtype_name, eos_ids, rope_settings
from llmengine_runtime.models.parallel import shard_readers
from llmengine_runtime.models.weights import ParamTarget


def parse_llama(raw: dict[str, Any], arch: str = "llama", **overrides: Any) -> ModelConfig:
    """The Llama fields of a config.json (the families built on Llama pass their `arch` and own fields)."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported hidden_act {act!r} for {raw.get('architectures') or arch}; "
                          "supported: 'silu'")
    if raw.get("pretraining_tp", 1) != 1:
        raise ConfigError("unsupported pretraining_tp != 1; supported: 1")
    num_heads = raw["num_attention_heads"]
    theta, scaling = rope_settings(raw)
    bias = bool(raw.get("attention_bias", False))
    fields = dict(
        arch=arch,
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
        attention_bias=bias,
        attention_out_bias=bias,
        mlp_bias=raw.get("mlp_bias", False),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos_ids(raw),
        torch_dtype=dtype_name(raw),
    )
    return ModelConfig(**{**fields, **overrides})


class LlamaBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config, bias=config.attention_bias, out_bias=config.attention_out_bias,
                              qk_norm=config.qk_norm, window=config.window(layer))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope, meta: AttentionMetadata,
                kv_cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output without the residual, residual): the next norm adds them, fused."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.attn(x, rope, meta, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


def llama_targets(model: nn.Module, config: ModelConfig) -> dict[str, ParamTarget]:
    """HF checkpoint name -> where it lands; q/k/v and gate/up go into row ranges of fused matrices. Under tensor
    parallelism (`model.tp`), each projection takes its rank's rows or columns (models/parallel.py). Per-head q/k
    norms (`qk_norm`, Qwen3) are replicated."""
    local = model.shard_config
    q, kv, inter = local.num_heads * local.head_dim, local.num_kv_heads * local.head_dim, local.intermediate_size
    reads = shard_readers(model.tp, config)
    targets = {"model.embed_tokens.weight": ParamTarget(model.embed.weight),
               "model.norm.weight": ParamTarget(model.norm.weight)}
    if not config.tie_word_embeddings:
        targets["lm_head.weight"] = ParamTarget(model.lm_head.weight)
    for i, block in enumerate(model.layers):
        pre = f"model.layers.{i}."
        attn, mlp = block.attn, block.mlp
        for kind in ["weight", "bias"] if config.attention_bias else ["weight"]:
            fused = getattr(attn.qkv_proj, kind)
            targets[f"{pre}self_attn.q_proj.{kind}"] = ParamTarget(fused, 0, q, read=reads.q_rows)
            targets[f"{pre}self_attn.k_proj.{kind}"] = ParamTarget(fused, q, kv, read=reads.kv_rows)
            targets[f"{pre}self_attn.v_proj.{kind}"] = ParamTarget(fused, q + kv, kv, read=reads.kv_rows)
        targets[f"{pre}self_attn.o_proj.weight"] = ParamTarget(attn.o_proj.weight, read=reads.attn_columns)
        if config.attention_out_bias:
            targets[f"{pre}self_attn.o_proj.bias"] = ParamTarget(attn.o_proj.bias)
        if config.qk_norm:
            targets[f"{pre}self_attn.q_norm.weight"] = ParamTarget(attn.q_norm.weight)
            targets[f"{pre}self_attn.k_norm.weight"] = ParamTarget(attn.k_norm.weight)
        for kind in ["weight", "bias"] if config.mlp_bias else ["weight"]:
            fused = getattr(mlp.gate_up_proj, kind)
            targets[f"{pre}mlp.gate_proj.{kind}"] = ParamTarget(fused, 0, inter, read=reads.mlp_rows)
            targets[f"{pre}mlp.up_proj.{kind}"] = ParamTarget(fused, inter, inter, read=reads.mlp_rows)
            targets[f"{pre}mlp.down_proj.{kind}"] = ParamTarget(
                getattr(mlp.down_proj, kind), read=reads.mlp_columns if kind == "weight" else None)
        targets[f"{pre}input_layernorm.weight"] = ParamTarget(block.input_layernorm.weight)
        targets[f"{pre}post_attention_layernorm.weight"] = ParamTarget(block.post_attention_layernorm.weight)
    return targets


FAMILY = Family("llama", frozenset({"LlamaForCausalLM"}), frozenset({"llama"}), parse_llama, LlamaBlock, RMSNorm,
                llama_targets, GGUFNames("llama", permuted_rotary=True))
