"""Falcon: its config.json, its decoder block in three variants (docs/architecture.md, "Model variants") and its
checkpoint names.

- falcon-7b: multi-query, parallel attention + MLP, one `input_layernorm`, RoPE, no biases.
- falcon-40b/180B (`new_decoder_architecture`): grouped KV, parallel, `ln_attn` + `ln_mlp`
  (or only `input_layernorm` when `num_ln_in_parallel_attn == 1`), RoPE.
- falcon-rw: MHA, sequential attention then MLP with two norms, ALiBi, biases.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from llmengine_runtime.models.attention import AttentionMetadata, KVCache
from llmengine_runtime.models.family_entry import Family
from llmengine_runtime.models.layers import Attention, GeluMLP, LayerNorm
from llmengine_runtime.models.model_config import ConfigError, ModelConfig, dtype_name, eos_ids, rope_settings
from llmengine_runtime.models.parallel import Reader, TensorParallel, merge_runs, read_rows, shard_readers
from llmengine_runtime.models.weights import ParamTarget


def parse_falcon(raw: dict[str, Any]) -> ModelConfig:
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
    theta, scaling = rope_settings(raw)
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
        eos_token_id=eos_ids(raw),
        torch_dtype=dtype_name(raw),
    )


class FalconBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        hidden, eps = config.hidden_size, config.norm_eps
        self.parallel = config.parallel_attn
        self.two_norms = config.new_decoder_architecture and config.num_ln_in_parallel_attn == 2
        if self.two_norms:
            self.ln_attn, self.ln_mlp = LayerNorm(hidden, eps), LayerNorm(hidden, eps)
        else:
            self.input_layernorm = LayerNorm(hidden, eps)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(hidden, eps)
        self.attn = Attention(config, bias=config.bias, out_bias=config.bias)
        self.mlp = GeluMLP(hidden, config.intermediate_size, bias=config.bias)

    def forward(self, x: torch.Tensor, residual: None, rope, meta: AttentionMetadata,
                kv_cache: KVCache | None) -> tuple[torch.Tensor, None]:
        """Returns (x + block(x), None): Falcon's norms have biases, so the residual is added here."""
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn_out = self.attn(attn_in, rope, meta, kv_cache)
        if not self.parallel:
            x = x + attn_out
            return x + self.mlp(self.post_attention_layernorm(x)), None
        return x + (self.mlp(mlp_in) + attn_out), None


def qkv_rows_to_blocks(w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Reorder Falcon's fused query_key_value rows into [q heads; k heads; v heads]."""
    d, h, h_kv = config.head_dim, config.num_heads, config.num_kv_heads
    tail = w.shape[1:]
    if config.new_decoder_architecture:  # per KV group: [q_0 .. q_{g-1}, k, v]
        grouped = w.reshape(h_kv, h // h_kv + 2, d, *tail)
        q, k, v = grouped[:, :-2], grouped[:, -2], grouped[:, -1]
    elif config.multi_query:  # [q_0 .. q_{H-1}, k, v]: already blocks
        return w
    else:  # MHA: per head [q, k, v]
        per_head = w.reshape(h, 3, d, *tail)
        q, k, v = per_head[:, 0], per_head[:, 1], per_head[:, 2]
    return torch.cat([q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)])


def qkv_head_rows(config: ModelConfig, kind: str, head: int) -> int:
    """The first row of query (`kind` "q") or key/value ("k", "v") head `head` in Falcon's fused query_key_value."""
    d, h, h_kv = config.head_dim, config.num_heads, config.num_kv_heads
    if config.new_decoder_architecture:  # per KV group: [q_0 .. q_{g-1}, k, v]
        g = h // h_kv
        group, within = (head // g, head % g) if kind == "q" else (head, g if kind == "k" else g + 1)
        return (group * (g + 2) + within) * d
    if config.multi_query:  # [q_0 .. q_{H-1}, k, v]
        return head * d if kind == "q" else (h if kind == "k" else h + 1) * d
    return (3 * head + "qkv".index(kind)) * d  # MHA: per head [q, k, v]


def qkv_reader(tp: TensorParallel, config: ModelConfig) -> Reader:
    """Reads this rank's query heads, then their KV heads' k and v, from the fused query_key_value: already in the
    [q heads; k heads; v heads] order the model uses, whole KV groups where the rank holds whole groups."""
    (h0, h1), (k0, k1) = tp.heads(config), tp.kv_heads(config)
    rows = [qkv_head_rows(config, "q", h) for h in range(h0, h1)]
    rows += [qkv_head_rows(config, kind, h) for kind in "kv" for h in range(k0, k1)]
    return read_rows(merge_runs(rows, config.head_dim))


def falcon_targets(model: nn.Module, config: ModelConfig) -> dict[str, ParamTarget]:
    """HF checkpoint name -> where it lands; under tensor parallelism (`model.tp`), each rank's part."""
    kinds = ["weight", "bias"] if config.bias else ["weight"]
    reads = shard_readers(model.tp, config)
    read_qkv = None if model.tp is None else qkv_reader(model.tp, config)
    targets = {"transformer.word_embeddings.weight": ParamTarget(model.embed.weight),
               "transformer.ln_f.weight": ParamTarget(model.norm.weight),
               "transformer.ln_f.bias": ParamTarget(model.norm.bias)}
    if not config.tie_word_embeddings:
        targets["lm_head.weight"] = ParamTarget(model.lm_head.weight)
    reorder = partial(qkv_rows_to_blocks, config=config)
    for i, block in enumerate(model.layers):
        pre = f"transformer.h.{i}."
        for kind in kinds:
            weight = kind == "weight"
            targets[f"{pre}self_attention.query_key_value.{kind}"] = ParamTarget(
                getattr(block.attn.qkv_proj, kind), transform=None if read_qkv else reorder, read=read_qkv)
            targets[f"{pre}self_attention.dense.{kind}"] = ParamTarget(
                getattr(block.attn.o_proj, kind), read=reads.attn_columns if weight else None)
            targets[f"{pre}mlp.dense_h_to_4h.{kind}"] = ParamTarget(getattr(block.mlp.up_proj, kind),
                                                                    read=reads.mlp_rows)
            targets[f"{pre}mlp.dense_4h_to_h.{kind}"] = ParamTarget(
                getattr(block.mlp.down_proj, kind), read=reads.mlp_columns if weight else None)
        norms = ["ln_attn", "ln_mlp"] if block.two_norms else ["input_layernorm"]
        if not block.two_norms and not block.parallel:
            norms.append("post_attention_layernorm")
        for name in norms:
            for kind in ("weight", "bias"):
                targets[f"{pre}{name}.{kind}"] = ParamTarget(getattr(getattr(block, name), kind))
    return targets


FAMILY = Family("falcon", frozenset({"FalconForCausalLM", "RWForCausalLM"}),
                frozenset({"falcon", "RefinedWebModel", "RefinedWeb"}), parse_falcon, FalconBlock, LayerNorm,
                falcon_targets)
