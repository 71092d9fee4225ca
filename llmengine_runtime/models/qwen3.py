"""Qwen3: Llama with an RMSNorm over each q and k head (weights `[head_dim]`, `self_attn.q_norm` / `k_norm`) before
rotary, an explicit `head_dim` (not hidden / heads), and q/k/v/o biases only with `attention_bias`. Sliding windows
as Qwen2's. GGUF (`general.architecture` "qwen3"): HF's q/k row order, the norms as `blk.N.attn_{q,k}_norm`.
"""

from __future__ import annotations

from typing import Any

from llmengine_runtime.models.family_entry import Family, GGUFNames
from llmengine_runtime.models.layers import RMSNorm
from llmengine_runtime.models.llama import LlamaBlock, llama_targets, parse_llama
from llmengine_runtime.models.model_config import ModelConfig
from llmengine_runtime.models.qwen2 import qwen_layer_windows


def parse_qwen3(raw: dict[str, Any]) -> ModelConfig:
    return parse_llama({"head_dim": 128, **raw}, "qwen3", qk_norm=True, layer_windows=qwen_layer_windows(raw))


def gguf_extra_config(meta: dict, tensor_names: set[str]) -> dict[str, Any]:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}


FAMILY = Family("qwen3", frozenset({"Qwen3ForCausalLM"}), frozenset({"qwen3"}), parse_qwen3, LlamaBlock, RMSNorm,
                llama_targets,
                GGUFNames("qwen3", permuted_rotary=False, extra_config=gguf_extra_config,
                          layer_names={"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}))
