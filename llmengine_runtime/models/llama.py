"""Llama decoder block (pre-norm, RMSNorm fused with the residual add) and its checkpoint names."""

from __future__ import annotations

import torch
from torch import nn

from llmengine_runtime.models.attention import AttentionMetadata, KVCache
from llmengine_runtime.models.config import ModelConfig
from llmengine_runtime.models.layers import Attention, GatedMLP, RMSNorm
from llmengine_runtime.models.parallel import shard_readers
from llmengine_runtime.models.weights import ParamTarget


class LlamaBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config, bias=config.attention_bias, out_bias=config.attention_bias)
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
    parallelism (`model.tp`), each projection takes its rank's rows or columns (models/parallel.py)."""
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
        kinds = ["weight", "bias"] if config.attention_bias else ["weight"]
        for kind in kinds:
            fused = getattr(attn.qkv_proj, kind)
            targets[f"{pre}self_attn.q_proj.{kind}"] = ParamTarget(fused, 0, q, read=reads.q_rows)
            targets[f"{pre}self_attn.k_proj.{kind}"] = ParamTarget(fused, q, kv, read=reads.kv_rows)
            targets[f"{pre}self_attn.v_proj.{kind}"] = ParamTarget(fused, q + kv, kv, read=reads.kv_rows)
            targets[f"{pre}self_attn.o_proj.{kind}"] = ParamTarget(
                getattr(attn.o_proj, kind), read=reads.attn_columns if kind == "weight" else None)
        for kind in ["weight", "bias"] if config.mlp_bias else ["weight"]:
            fused = getattr(mlp.gate_up_proj, kind)
            targets[f"{pre}mlp.gate_proj.{kind}"] = ParamTarget(fused, 0, inter, read=reads.mlp_rows)
            targets[f"{pre}mlp.up_proj.{kind}"] = ParamTarget(fused, inter, inter, read=reads.mlp_rows)
            targets[f"{pre}mlp.down_proj.{kind}"] = ParamTarget(
                getattr(mlp.down_proj, kind), read=reads.mlp_columns if kind == "weight" else None)
        targets[f"{pre}input_layernorm.weight"] = ParamTarget(block.input_layernorm.weight)
        targets[f"{pre}post_attention_layernorm.weight"] = ParamTarget(block.post_attention_layernorm.weight)
    return targets
