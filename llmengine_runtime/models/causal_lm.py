"""The decoder-only language model every family shares: embed -> blocks -> final norm -> tied or own head.

What differs per family (its block, final norm and checkpoint names) comes from its entry in models/families.py.
"""

from __future__ import annotations

import torch
from torch import nn

from llmengine_runtime.kernels.deterministic_matmul import linear
from llmengine_runtime.models.attention import AttentionMetadata, KVCache
from llmengine_runtime.models.config import ModelConfig
from llmengine_runtime.models.families import family
from llmengine_runtime.models.layers import Linear, alibi_slopes
from llmengine_runtime.models.packed_linear import pack, pack_linear, packed_linear
from llmengine_runtime.models.parallel import RowParallel, TensorParallel
from llmengine_runtime.models.rope import RotaryEmbedding
from llmengine_runtime.models.weights import ParamTarget


class CausalLM(nn.Module):
    """`forward` maps packed token ids to final hidden states; `compute_logits` maps hidden states to logits."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None):
        """`tp`: this rank's place under tensor parallelism (models/parallel.py); None: the whole model."""
        super().__init__()
        self.config = config
        self.tp = tp
        # The sizes of this rank's layers and KV cache (its heads, its part of the MLP); `config` without tp.
        self.shard_config = config if tp is None else tp.shard_config(config)
        self.family = family(config.arch)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.family.block(self.shard_config, i) for i in range(config.num_layers))
        if tp is not None:  # o_proj and down_proj sum their partial products over the ranks
            for layer in self.layers:
                layer.attn.o_proj = RowParallel(layer.attn.o_proj)
                layer.mlp.down_proj = RowParallel(layer.mlp.down_proj)
        self.norm = self.family.final_norm(config.hidden_size, config.norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size,
                                                                      bias=False)
        self.rope = None
        self.head_packed_index: int | None = None  # a tied head's copy, packed for oneDNN
        # A tied head's quantized copy (models/quantized_linear.py), used before the above: the embedding table
        # stays a float table for the lookups, and `lm_head is None` still means "tied".
        self.quantized_head: nn.Module | None = None
        self.quantization: str | None = None  # what the loader did, e.g. "int4 g64" (None: float weights)
        if self.embed.weight.device.type != "meta":  # the loader builds on meta, then calls init_buffers
            self.init_buffers(self.embed.weight.device)

    def init_buffers(self, device: torch.device | str = "cpu") -> None:
        """(Re)compute the tables that are not weights: RoPE angles and ALiBi slopes."""
        self.rope = RotaryEmbedding(self.config, device) if self.config.use_rope else None
        slopes = None
        if self.tp is not None and self.config.alibi:  # this rank's heads' slopes
            start, stop = self.tp.heads(self.config)
            slopes = alibi_slopes(self.config.num_heads)[start:stop]
        for block in self.layers:
            block.attn.init_alibi(device, slopes)

    def use_packed_weights(self) -> None:
        """Move every projection matrix, and the head, to oneDNN's packed layout (CPU, fp32 or bf16)."""
        for module in self.modules():
            if isinstance(module, Linear):
                pack_linear(module)
        if self.lm_head is None and self.quantized_head is None:
            self.head_packed_index = pack(self.embed.weight.data, self)

    def checkpoint_targets(self) -> dict[str, ParamTarget]:
        return self.family.targets(self, self.config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """input_ids, positions `[num_tokens]` -> hidden `[num_tokens, hidden]` (after the final norm)."""
        rope = None
        if self.rope is not None:
            rope = self.rope.cos_sin(positions, meta.seq_len_per_token() if self.rope.rope_type == "dynamic"
                                     else None)
        x, residual = self.embed(input_ids), None
        for i, block in enumerate(self.layers):
            x, residual = block(x, residual, rope, meta, None if kv_caches is None else kv_caches[i])
        if residual is not None:
            x, _ = self.norm(x, residual)
            return x
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantized_head is not None:
            return self.quantized_head(hidden)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if self.head_packed_index is not None:
            return packed_linear(hidden, self.head_packed_index, self.config.vocab_size)
        return linear(hidden, self.embed.weight)  # F.linear; under --deterministic on CUDA fixed tiles
