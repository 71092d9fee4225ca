"""A whole step of a quantized Llama in one C++ call (kernels/cpu/decode_step.cpp), on the CPU.

In eager PyTorch a batch-1 decode step of the default model is ~300 small op calls from Python (norms,
rotary, cache store, attention, activation, the projections), ~10 us each on this CPU: about as much time as
the weight products themselves. `LlamaDecoder.step` runs the same math, through the same C++ kernels the
eager path calls one by one, in a single call per step; the decoder holds the weights and KV caches, bound once.

It applies (`FusedDecode.build` returns None otherwise, and the model runs its eager blocks) when: the model
is a Llama-architecture CausalLM (RMSNorm, RoPE other than dynamic, gated SiLU MLP; no per-head q/k norm, no
sliding window) or a Falcon (any of its three forms, RoPE or ALiBi: kernels/cpu/falcon_step.cpp) without tensor
parallelism; every projection is a QuantizedLinear on our CPU kernels
(`backend == "cpu"`: int4 or int8), a FloatLinear (bf16, fp16 or fp32 rows: models/float_linear.py) or a GGUF layer
(models/gguf_linear.py: GGUFLinear, GGUFRowParts) whose every part runs the C++ GGUF product (`backend == "cpu"`),
in any mix; norms are fp32, the embedding table an fp32 nn.Embedding
or a GGUFEmbedding of fp32 rows (the step dequantizes the rows it looks up, as the eager lookup does); the KV caches
fp32 or fp16; the C++ kernels are built; `LLMENGINE_FUSED_DECODE` is not "0". The numbers are the eager path's: the same
kernels in the same order (tests/models/test_fused_decode.py checks it).

Without the head (`__call__`) it runs decode steps (one new token per sequence). When the head is a QuantizedLinear or a
GGUF layer on our kernels too (a quantized model's, a GGUF's tied Q8_0 head, a GGUF's Q6_K table or output), the step
also runs the head's product on the rows whose logits are wanted, on the same threads, and takes each row's argmax as it
goes (`step_buffers`): then it runs any step, prompt chunks and speculative verification rows beside decode rows, and
the runner gets the logits without another Python call, and a greedy batch its tokens without the sampler's. Those steps
take their inputs from, and write their outputs to, buffers bound once (runtime/step.py).
"""

from __future__ import annotations

import ctypes
import os
from typing import Protocol

import torch
from torch import nn

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.models.attention import AttentionMetadata, KVCache
from llmengine_runtime.models.float_linear import FloatLinear
from llmengine_runtime.models.gguf_linear import GGUFEmbedding, GGUFLinear, GGUFRowParts
from llmengine_runtime.models.gguf_types import has_cpu_product
from llmengine_runtime.models.layers import LayerNorm, RMSNorm
from llmengine_runtime.models.quantized_linear import QuantizedLinear


def _gguf_parts(layer: nn.Module) -> tuple[list[GGUFLinear], torch.Tensor | None] | None:
    """The GGUF parts of a GGUFLinear / GGUFRowParts whose every part runs on the C++ product, and its bias."""
    if isinstance(layer, GGUFLinear):
        parts = [layer]
    elif isinstance(layer, GGUFRowParts):
        parts = list(layer.parts)
    else:
        return None
    if not all(p.backend == "cpu" and p.raw.is_contiguous() for p in parts):
        return None
    return parts, layer.bias


def _projection(layer: nn.Module, raws: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """(qs, d, m, bias) of a QuantizedLinear on our CPU kernels (empty m for int8, empty bias); or for a GGUF layer
    on the C++ product (spec int64 [parts, 2] of (ggml type, index of its raw rows, appended to `raws`), empty,
    empty, bias); else None."""
    empty = torch.empty(0)
    gguf = _gguf_parts(layer)
    if gguf is not None:
        parts, bias = gguf
        spec = torch.tensor([[int(p.ggml_type), len(raws) + i] for i, p in enumerate(parts)], dtype=torch.int64)
        raws.extend(p.raw for p in parts)
        return [spec, empty, empty, empty if bias is None else bias.float().contiguous()]
    if isinstance(layer, FloatLinear):  # bf16/fp16/fp32 rows, interleaved (models/float_linear.py)
        return [layer.w_rows, empty, empty, empty if layer.bias is None else layer.bias]
    if not isinstance(layer, QuantizedLinear) or layer.backend != "cpu":
        return None
    if layer.mode == "int4":
        qs, m = layer.w_int4, layer.m
    else:
        qs, m = layer.w_int8, empty
    return [qs, layer.d, m, empty if layer.bias is None else layer.bias.float()]


class StepBuffers(Protocol):
    """What `step_buffers` binds (runtime/step.py has the layouts): input tensors, then logits and argmax outputs, of
    which a step reads its first `rows` sequences, `num_tokens` tokens and `len(logit_index)` logits rows; a new
    `version` means new tensors."""

    rows: int
    num_tokens: int
    logit_index: list[int]
    version: int

    def tensors(self) -> tuple[torch.Tensor, ...]: ...

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]: ...


LLAMA, FALCON_PARALLEL, FALCON_SEQUENTIAL = 0, 1, 2  # the step's layer forms (kernels/cpu/decoder.h: BlockForm)


def _llama_blocks(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[nn.Module]] | None:
    """Norm weights (each layer's input and post-attention RMSNorms, then the final one), no biases, and each layer's
    qkv, o, gate_up, down; None where a block is not Llama's form."""
    norms, layers = [], []
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        if not hasattr(mlp, "gate_up_proj") or not isinstance(block.input_layernorm, RMSNorm):
            return None
        layers += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        norms += [block.input_layernorm.weight, block.post_attention_layernorm.weight]
    return norms + [model.norm.weight], [], layers


def _falcon_blocks(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[nn.Module]] | None:
    """Falcon's LayerNorms as (weights, biases): per layer attention's then the MLP's (one norm feeding both: the
    same tensors twice; falcon-rw: input and post-attention), then the final one; and each layer's qkv, dense (o), up
    and down."""
    norms = []
    for block in model.layers:
        if block.two_norms:
            norms += [block.ln_attn, block.ln_mlp]
        elif block.parallel:
            norms += [block.input_layernorm, block.input_layernorm]
        else:
            norms += [block.input_layernorm, block.post_attention_layernorm]
    norms.append(model.norm)
    if not all(isinstance(n, LayerNorm) for n in norms):
        return None
    layers = [p for b in model.layers for p in (b.attn.qkv_proj, b.attn.o_proj, b.mlp.up_proj, b.mlp.down_proj)]
    return [n.weight for n in norms], [n.bias for n in norms], layers


class FusedDecode:
    def __init__(self, model: nn.Module, norms: list[torch.Tensor], proj: list[torch.Tensor],
                 head: list[torch.Tensor] | None, raws: list[torch.Tensor], head_rows: int, form: int = LLAMA,
                 norm_biases: list[torch.Tensor] | None = None):
        self.model, self.norms, self.proj, self.head, self.raws = model, norms, proj, head, raws
        self.form, self.norm_biases = form, norm_biases or []
        attn = model.layers[0].attn
        self.alibi = attn.alibi_slopes.float().contiguous() if attn.alibi_slopes is not None else torch.empty(0)
        # RoPE's table, or for ALiBi an empty one (the step reads none)
        self.no_rope = torch.empty(0, attn.head_dim)
        self.rope = model.rope  # (a module attribute lookup goes through nn.Module.__getattr__: slow when cold)
        self.has_head = head is not None  # the head's product runs in the step too (`step_buffers`)
        self.head_rows = head_rows if head is not None else 0  # the logits' width (compute_logits')
        self.decoder, self.bound_caches = None, None  # bound to the runner's KV caches at the first step
        self.bound_buffers, self.bound_version, self.bound_cos_sin = None, 0, None  # and to its DecodeBuffers
        self.decoder_step = None  # the decoder's step method, looked up once (~3 us a lookup, more when cold)
        self.handle = 0  # the decoder's number for decode_step, the C entry point of `step_buffers`
        self.step_function = cpu_kernels.step_function() if self.has_head else None
        self.error = ctypes.create_string_buffer(2048)

    def bind(self, kv_caches: list[KVCache]) -> None:
        attn, embed = self.model.layers[0].attn, self.model.embed
        if isinstance(embed, GGUFEmbedding):  # the table's bytes: the step dequantizes the rows it looks up
            table, table_type = embed.raw, int(embed.ggml_type)
        else:
            table, table_type = embed.weight.detach(), 0
        self.decoder = torch.classes.llmengine_cpu.LlamaDecoder(
            table, self.norms, self.proj, [k for k, _ in kv_caches], [v for _, v in kv_caches], self.head or [],
            attn.num_heads, attn.num_kv_heads, attn.head_dim, self.model.norm.eps, attn.scale, self.raws,
            table_type, self.form, self.norm_biases, self.alibi)
        self.decoder_step, self.handle = self.decoder.step, self.decoder.handle()
        self.bound_caches, self.bound_buffers = kv_caches, None

    @staticmethod
    def build(model: nn.Module) -> FusedDecode | None:
        config = model.config
        # (the step has no per-head q/k norm (Qwen3) and no sliding window (Mistral, Qwen2 with windows): those
        # keep the eager blocks; per-projection biases it adds as the eager layers do: Qwen2's q/k/v without o)
        falcon = config.arch == "falcon"
        if (os.environ.get("LLMENGINE_FUSED_DECODE", "1") == "0" or model.tp is not None
                or (model.rope is None) != (falcon and config.alibi)
                or (model.rope is not None and model.rope.rope_type == "dynamic") or config.qk_norm
                or any(config.layer_windows) or not cpu_kernels.available()):
            return None
        blocks = _falcon_blocks(model) if falcon else _llama_blocks(model)
        if blocks is None:
            return None
        norms, biases, layers = blocks
        proj, raws = [], []
        for layer in layers:
            tensors = _projection(layer, raws)
            if tensors is None:
                return None
            proj.extend(tensors)
        embed = model.embed
        if isinstance(embed, GGUFEmbedding):  # a GGUF table kept as its bytes (models/gguf_linear.py)
            if (embed.raw.device.type != "cpu" or not embed.raw.is_contiguous() or embed.dtype != torch.float32
                    or not has_cpu_product(embed.ggml_type)):
                return None
        elif type(embed) is not nn.Embedding:
            return None
        if not all(w.dtype == torch.float32 and w.device.type == "cpu" for w in norms + biases + [embed.weight]):
            return None
        # the head compute_logits uses: a quantized copy of a tied head first (or a GGUF tied table's bytes)
        head_layer = model.quantized_head if model.quantized_head is not None else model.lm_head
        head = _projection(head_layer, raws)
        head_rows = head_layer.out_features if head is not None else 0
        form = (FALCON_PARALLEL if config.parallel_attn else FALCON_SEQUENTIAL) if falcon else LLAMA
        return FusedDecode(model, [w.detach() for w in norms], proj, head, raws, head_rows, form,
                           [b.detach() for b in biases])

    def applies(self, kv_caches: list[KVCache] | None) -> bool:
        """Whether it can run decode steps over these caches."""
        # (the caches bound already passed the check: a step runs cold, so every Python call saved counts)
        return (kv_caches is not None and (kv_caches is self.bound_caches or cpu_kernels.cpu_kv_caches(*kv_caches[0]))
                and not torch.compiler.is_compiling())

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[KVCache]) -> torch.Tensor:
        if kv_caches is not self.bound_caches:
            self.bind(kv_caches)
        # The engine sized the table for its max model length (RotaryEmbedding.reserve); the step checks every
        # position against it and says so if one is outside.
        return self.decoder_step(input_ids, positions, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                 self.no_rope if self.rope is None else self.rope.cos_sin_cache)

    def step_buffers(self, buffers: StepBuffers, kv_caches: list[KVCache], argmax: bool) -> None:
        """The step over `buffers`' filled rows and the head's product (`has_head` only), into `buffers`: the
        logits `[len(logit_index), vocab]` as `model.compute_logits` gives them, and with `argmax` each row's argmax (as
        `logits.argmax(-1)`). Called through ctypes (kernels/cpu/decoder.cpp says why); RuntimeError with the
        step's message if it fails."""
        if kv_caches is not self.bound_caches:
            self.bind(kv_caches)
        cos_sin = self.no_rope if self.rope is None else self.rope.cos_sin_cache
        if (buffers is not self.bound_buffers or buffers.version != self.bound_version
                or cos_sin is not self.bound_cos_sin):
            self.decoder.bind_buffers(*buffers.tensors(), cos_sin, *buffers.outputs())
            self.bound_buffers, self.bound_version, self.bound_cos_sin = buffers, buffers.version, cos_sin
        if self.step_function(self.handle, buffers.rows, buffers.num_tokens, len(buffers.logit_index), argmax,
                              self.error, len(self.error)):
            raise RuntimeError(self.error.value.decode(errors="replace"))
