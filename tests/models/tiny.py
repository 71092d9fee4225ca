"""Tiny random transformers checkpoints of every model variant we support, saved as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 128

LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "llama-mha": dict(LLAMA_BASE),
    "llama-gqa-tied-bias": dict(LLAMA_BASE, num_key_value_heads=2, tie_word_embeddings=True,
                                attention_bias=True, rms_norm_eps=1e-6),
    "llama-mqa-linear": dict(LLAMA_BASE, num_key_value_heads=1, rope_scaling={"type": "linear", "factor": 2.0}),
    "llama-dynamic": dict(LLAMA_BASE, num_key_value_heads=2, max_position_embeddings=24,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama3-rope": dict(LLAMA_BASE, num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "falcon-7b-like": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           multi_query=True, parallel_attn=True, bias=False, alibi=False,
                           new_decoder_architecture=False, bos_token_id=1, eos_token_id=2),
    "falcon-40b-like": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                            num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True, bias=False,
                            alibi=False, bos_token_id=1, eos_token_id=2),
    "falcon-11b-like": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                            num_kv_heads=2, new_decoder_architecture=True, num_ln_in_parallel_attn=1,
                            parallel_attn=True, bias=False, alibi=False, ffn_hidden_size=160,
                            bos_token_id=1, eos_token_id=2),
    "falcon-rw-like": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           multi_query=False, parallel_attn=False, bias=True, alibi=True,
                           new_decoder_architecture=False, bos_token_id=1, eos_token_id=2),
}


def make_hf_model(variant: str, seed: int = 0):
    import transformers

    kwargs = VARIANTS[variant]
    torch.manual_seed(seed)
    if variant.startswith("llama"):
        config = transformers.LlamaConfig(**kwargs)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.FalconConfig(**kwargs)
        model = transformers.FalconForCausalLM(config)
    with torch.no_grad():  # random biases and norm weights too, so a dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_tiny(variant: str, path: Path, seed: int = 0, **save_kwargs) -> Path:
    model = make_hf_model(variant, seed)
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return path


def write_tiny_llama(folder: Path, vocab_size: int) -> Path:
    """A random one-layer Llama, written directly (importing transformers would take seconds)."""
    hidden, inter, head_dim, heads, kv_heads = 16, 32, 8, 2, 1
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    shapes = {"model.embed_tokens.weight": (vocab_size, hidden), "model.norm.weight": (hidden,),
              "model.layers.0.input_layernorm.weight": (hidden,),
              "model.layers.0.post_attention_layernorm.weight": (hidden,),
              "model.layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
              "model.layers.0.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
              "model.layers.0.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
              "model.layers.0.self_attn.o_proj.weight": (hidden, heads * head_dim),
              "model.layers.0.mlp.gate_proj.weight": (inter, hidden),
              "model.layers.0.mlp.up_proj.weight": (inter, hidden),
              "model.layers.0.mlp.down_proj.weight": (hidden, inter)}
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({name: torch.randn(shape, generator=generator) * 0.5 for name, shape in shapes.items()},
              str(folder / "model.safetensors"))
    return folder
