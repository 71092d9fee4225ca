"""Quantize a loaded float model at load time as llama-quantize would: `--quantize q4_k_m` (or any of MIXTURES).

    quantize_model_gguf(model, "q4_k_m")   # every projection, the embedding and the head -> GGUF block bytes

Each projection's weight (and the embedding table, and an own lm_head) gets the type llama.cpp's mixture gives
its GGUF tensor (models/gguf_quantize_mix.py), is quantized to that type's bytes by llama.cpp's reference
quantizers (models/gguf_quantize.py: byte-identical to `llama_model_quantize` on the same F32 tensor) and is served
by models/gguf_linear.py's GGUFLinear (GGUFRowParts where the fused q|k|v or gate|up parts differ in type). The
table becomes a GGUFEmbedding, and a tied head a GGUFLinear over its bytes. q and k rows stay in HF order: a block
never crosses a row, so each row's bytes are the ones llama.cpp writes for that row in its rotary order.
This is the llama.cpp-compatible choice; `--quantize int8` / `int4` are our older schemes (int8 per output
channel, int4 min/max in groups of 64: models/quantized_linear.py), not llama.cpp's algorithms.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from gguf import GGMLQuantizationType
from torch import nn
from tqdm import tqdm

from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.models.gguf import LAYER_NAMES, TOP_NAMES
from llmengine_runtime.models.gguf_linear import GGUFEmbedding
from llmengine_runtime.models.gguf_quant import GGUFRawWeights, gguf_projection
from llmengine_runtime.models.gguf_quantize import quantize_rows
from llmengine_runtime.models.gguf_quantize_mix import MIXTURES, mixture_types
from llmengine_runtime.models.layers import Linear

EMBEDDING = "model.embed_tokens.weight"
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def gguf_name(hf: str) -> str:
    """The llama.cpp tensor name of an HF llama checkpoint weight name (KeyError if it has none)."""
    if m := HF_LAYER.fullmatch(hf):
        part = {v: k for k, v in LAYER_NAMES.items()}.get(m[2])
        if part is not None:
            return f"blk.{m[1]}.{part}.weight"
    top = {f"{v}.weight": f"{k}.weight" for k, v in TOP_NAMES.items()}
    if hf in top:
        return top[hf]
    raise KeyError(f"{hf} has no llama.cpp name (quantizing to a GGUF mixture supports the Llama layout)")


def projections(model: CausalLM) -> dict[str, list[str]]:
    """{Linear module name: its checkpoint weight names in row order} (q|k|v and gate|up are fused)."""
    targets = model.checkpoint_targets()
    module_of = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters()}
    parts: dict[str, list[tuple[int, str]]] = {}
    for name, target in targets.items():
        module = module_of.get(id(target.param))
        if module is not None and name.endswith(".weight") and isinstance(model.get_submodule(module), Linear):
            parts.setdefault(module, []).append((target.row_start, name))
    return {module: [name for _, name in sorted(rows)] for module, rows in parts.items()}


def plan_types(model: CausalLM, mixture: str) -> dict[str, GGMLQuantizationType]:
    """{checkpoint name: GGUF type} for the model's projections and embedding under `mixture`."""
    if model.config.arch == "falcon":
        raise ValueError("GGUF mixtures at load are for the Llama layout; quantize Falcon with int8 or int4")
    targets = model.checkpoint_targets()
    names = [n for group in projections(model).values() for n in group] + [EMBEDDING]
    shapes = {gguf_name(n): tuple(targets[n].view().shape) for n in names}
    c = model.config
    types = mixture_types(mixture, shapes, n_layer=c.num_layers, n_head=c.num_heads, n_head_kv=c.num_kv_heads)
    return {n: types[gguf_name(n)] for n in names}


def quantize_model_gguf(model: CausalLM, mixture: str, progress: bool = True) -> None:
    """Replace the projections, the embedding and the head of a float `model` by GGUF layers holding the bytes
    llama-quantize's `mixture` would write (module docstring); sets `model.quantization`. Quantize before the
    weights are packed for oneDNN."""
    mixture = mixture.lower()
    if mixture not in MIXTURES:
        raise ValueError(f"unknown GGUF mixture {mixture!r}; expected one of {', '.join(MIXTURES)}")
    types = plan_types(model, mixture)
    targets = model.checkpoint_targets()
    groups = projections(model)
    kinds: Counter[str] = Counter()
    bar = tqdm(total=len(groups) + 1, desc=f"quantizing to {mixture}", unit="layer", disable=not progress)
    with torch.no_grad():
        for module, names in groups.items():
            linear = model.get_submodule(module)
            if linear.packed_index is not None or linear.weight.is_meta:
                raise ValueError(f"{module}: its weight was packed for oneDNN; quantize before packing")
            device = linear.weight.device
            parts = []
            for name in names:
                weight = targets[name].view()
                raw = quantize_rows(weight, types[name], desc=f"{name} -> {types[name].name}")
                parts.append(GGUFRawWeights(raw, types[name], weight.shape[1]))
                kinds[types[name].name] += 1
            _replace(model, module, gguf_projection(parts, linear.bias, device))
            bar.update(1)
        table, qtype = model.embed.weight, types[EMBEDDING]
        raw = quantize_rows(table, qtype, progress=progress, desc=f"embedding -> {qtype.name}")
        model.embed = GGUFEmbedding(raw.to(table.device), qtype, table.shape[1], table.dtype)
        kinds[f"{qtype.name} (embedding)"] += 1
        if model.lm_head is None:
            model.quantized_head = model.embed.tied_head()
            kinds[f"{qtype.name} (tied head)"] += 1
        bar.update(1)
    bar.close()
    model.quantization = f"{mixture} (llama.cpp's mixture): " + ", ".join(
        f"{name} x{count}" for name, count in sorted(kinds.items()))


def _replace(model: nn.Module, module: str, layer: nn.Module) -> None:
    parent, _, attr = module.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layer)
