"""Serve a llama-architecture GGUF as it is: its quantized tensors stay the file's integers, of any type in
models/gguf_types.py's table, mixed as the file mixes them (Q4_K_M files: Q4_K, Q6_K, ...).

- `gguf_model_folder(gguf_path, cache_root)`: a model folder holding everything but the weights (config.json and
  the tokenizer files from the GGUF's metadata, written by models/gguf.py's own functions, and gguf_source.json
  naming the GGUF), so the engine, the tokenizer and the server treat a GGUF like any model folder. Made once per
  file (keyed by its path, size and modification time) under `cache_root`, atomically.
- `load_gguf_model(config, gguf_path, dtype, device, keep_quantized)`: the CausalLM with every tensor read from
  the GGUF. A tensor of a type outside the table (IQ*, TQ*, MXFP4, ...) is refused by name before anything is
  loaded. With `keep_quantized`, a projection (q|k|v and gate|up are fused; so is an own lm_head) becomes:
  - whose parts are all Q4_0/Q4_1 (-> int4, groups of 32) or all Q8_0 (-> int8, per 32): a QuantizedLinear
    holding the file's integers (models/gguf_quant.py: exact up to the bf16 rounding of the scales on CPU); the
    fast path of our CPU kernels and of the fused decode step;
  - whose parts are all float (F32, F16, BF16): a float Linear, dequantized to `dtype`;
  - any other (a Q5_0/Q5_1/K-type part, or parts of mixed kinds): the file's bytes as they are, in a
    models/gguf_linear.py GGUFLinear (GGUFRowParts when the parts' types differ).
  The embedding table: float, Q4_0, Q4_1 and Q8_0 tables are dequantized to `dtype` for the lookups (a tied head
  of the last three gets `model.quantized_head` from the integers, as before); any other type stays the file's
  bytes in a GGUFEmbedding (a lookup dequantizes its rows), and a tied head is a GGUFLinear over the same bytes.
  Norms, biases, and everything without `keep_quantized`, are dequantized to `dtype` exactly as `llmengine
  convert` does (the table's dequantizers are bit-exact against gguf-py's).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFReader
from torch import nn
from tqdm import tqdm

from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.models.config import ModelConfig
from llmengine_runtime.models.gguf import (
    SKIPPED_TENSORS,
    gguf_rotary_heads,
    gguf_source,
    hf_name,
    read_gguf,
    unpermute_rotary,
    write_atomically,
    write_model_files,
)
from llmengine_runtime.models.gguf_linear import GGUFEmbedding
from llmengine_runtime.models.gguf_quant import (
    QUANTIZED_TYPES,
    concat_rows,
    gguf_int_weights,
    gguf_projection,
    gguf_raw_weights,
    quantized_linear,
    rotary_heads_for,
)
from llmengine_runtime.models.gguf_types import FLOAT_TYPES, TYPES, gguf_type, raw_rows, tensor_shape
from llmengine_runtime.models.layers import Linear
from llmengine_runtime.models.weights import WeightsError

EMBEDDING = "model.embed_tokens.weight"


def gguf_model_folder(gguf_path: str | Path, cache_root: Path) -> Path:
    """The weightless model folder of a GGUF (config, tokenizer, gguf_source.json), made on first use."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_root / f"{gguf_path.stem}-{key}"
    if (folder / "config.json").is_file() and gguf_source(folder) == gguf_path:
        return folder
    _, meta, config = read_gguf(gguf_path)
    try:
        return write_atomically(folder, lambda tmp: write_model_files(tmp, meta, config, gguf_path))
    except OSError:  # another process made it meanwhile
        if (folder / "config.json").is_file() and gguf_source(folder) == gguf_path:
            return folder
        raise


def _kind(qtype: GGMLQuantizationType) -> str | None:
    """The QuantizedLinear mode a GGUF type maps to exactly, or None (dequantize it)."""
    if qtype not in QUANTIZED_TYPES:
        return None
    return "int8" if qtype == GGMLQuantizationType.Q8_0 else "int4"


def _qtype(tensor) -> GGMLQuantizationType:
    return GGMLQuantizationType(tensor.tensor_type)


def linear_parts(model: CausalLM, tensors: dict[str, object]) -> dict[str, list[str]]:
    """{module name: its weights' checkpoint names in row order} for every Linear of `model`. `tensors`:
    checkpoint (HF) name -> GGUFReader tensor."""
    module_of = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters()}
    parts: dict[str, list[tuple[int, str]]] = {}
    for name, target in model.checkpoint_targets().items():
        module = module_of[id(target.param)]
        if name.endswith(".weight") and isinstance(model.get_submodule(module), Linear) and name in tensors:
            parts.setdefault(module, []).append((target.row_start, name))
    return {module: [name for _, name in sorted(rows)] for module, rows in parts.items()}


def quantized_projections(model: CausalLM, tensors: dict[str, object]) -> dict[str, list[str]]:
    """linear_parts' Linears whose parts all map to one integer kind (QuantizedLinear)."""
    groups = {}
    for module, names in linear_parts(model, tensors).items():
        kinds = {_kind(_qtype(tensors[n])) for n in names}
        if len(kinds) == 1 and None not in kinds:
            groups[module] = names
    return groups


def raw_projections(model: CausalLM, tensors: dict[str, object]) -> dict[str, list[str]]:
    """linear_parts' Linears kept as the file's bytes: some part quantized, and not all of one integer kind."""
    integer = quantized_projections(model, tensors)
    return {module: names for module, names in linear_parts(model, tensors).items()
            if module not in integer and any(_qtype(tensors[n]) not in FLOAT_TYPES for n in names)}


def _raw_embedding(tensor) -> bool:
    """A table kept as its bytes: a type that is neither float nor one of QuantizedLinear's."""
    return _qtype(tensor) not in FLOAT_TYPES and _kind(_qtype(tensor)) is None


def dense_tensor(tensor, rotary_heads: int | None) -> torch.Tensor:
    """A GGUF tensor dequantized to fp32 in HF layout (q/k rows back from llama.cpp's rotary order)."""
    shape = tensor_shape(tensor)
    w = TYPES[_qtype(tensor)].dequantize(raw_rows(tensor), shape[-1]).reshape(shape)
    return w if rotary_heads is None else unpermute_rotary(w, rotary_heads)


def _empty_weight(module: nn.Module) -> None:
    """No float copy of what stays quantized: an empty weight until the module is replaced."""
    module.weight = nn.Parameter(torch.empty(0, module.weight.shape[1], device="meta"), requires_grad=False)


def load_gguf_model(config: ModelConfig, gguf_path: str | Path, dtype: torch.dtype, device: str | torch.device,
                    keep_quantized: bool = True, progress: bool = True) -> CausalLM:
    """A CausalLM filled from a llama GGUF; see the module docstring. Sets `model.quantization` to what it kept."""
    gguf_path = Path(gguf_path)
    reader = GGUFReader(gguf_path)
    for t in reader.tensors:
        gguf_type(t.tensor_type, t.name)  # refuse IQ*, TQ*, ... before anything is loaded
    tensors = {hf_name(t.name): t for t in reader.tensors if t.name not in SKIPPED_TENSORS}
    heads = gguf_rotary_heads(config)  # (None: the family's GGUFs keep HF's q/k row order)
    with torch.device("meta"):
        model = CausalLM(config)
    groups = quantized_projections(model, tensors) if keep_quantized else {}
    raw_groups = raw_projections(model, tensors) if keep_quantized else {}
    raw_table = keep_quantized and EMBEDDING in tensors and _raw_embedding(tensors[EMBEDDING])
    for module in [*groups, *raw_groups, *(["embed"] if raw_table else [])]:
        _empty_weight(model.get_submodule(module))
    model = model.to_empty(device=device).to(dtype)
    model.init_buffers(device)

    targets = model.checkpoint_targets()
    kept = {name for names in [*groups.values(), *raw_groups.values()] for name in names}
    kept |= {EMBEDDING} if raw_table else set()
    unexpected = sorted(set(tensors) - set(targets))
    missing = sorted(set(targets) - set(tensors))
    if unexpected or missing:
        raise WeightsError(f"{gguf_path.name}: tensors without a place in the model {unexpected[:5]}, "
                           f"places without a tensor {missing[:5]}")
    kinds: Counter[str] = Counter()
    with torch.no_grad():
        for name in tqdm(sorted(set(targets) - kept), desc=f"loading {gguf_path.name}", unit="tensor",
                         disable=not progress):
            dest = targets[name].view()
            array = dense_tensor(tensors[name], rotary_heads_for(tensors[name].name, heads))
            if tuple(array.shape) != tuple(dest.shape):
                raise WeightsError(f"{gguf_path.name}: {name} has shape {tuple(array.shape)}, "
                                   f"expected {tuple(dest.shape)}")
            dest.copy_(array)
        for module, names in groups.items():
            parts = [gguf_int_weights(tensors[n], rotary_heads_for(tensors[n].name, heads)) for n in names]
            _replace(model, module, quantized_linear(concat_rows(parts), model.get_submodule(module).bias, device),
                     gguf_path)
            kinds.update(_qtype(tensors[n]).name for n in names)
        for module, names in raw_groups.items():
            parts = [gguf_raw_weights(tensors[n], rotary_heads_for(tensors[n].name, heads)) for n in names]
            _replace(model, module, gguf_projection(parts, model.get_submodule(module).bias, device), gguf_path)
            kinds.update(_qtype(tensors[n]).name for n in names)
        table = tensors[EMBEDDING]
        if raw_table:
            if tensor_shape(table) != (config.vocab_size, config.hidden_size):
                raise WeightsError(f"{gguf_path.name}: {EMBEDDING} has shape {tensor_shape(table)}, expected "
                                   f"{(config.vocab_size, config.hidden_size)}")
            model.embed = GGUFEmbedding(raw_rows(table).to(device), _qtype(table), config.hidden_size, dtype)
            kinds[f"{_qtype(table).name} (embedding)"] += 1
            if config.tie_word_embeddings:
                model.quantized_head = model.embed.tied_head()
                kinds[f"{_qtype(table).name} (tied head)"] += 1
        elif keep_quantized and config.tie_word_embeddings and _kind(_qtype(table)):
            model.quantized_head = quantized_linear(gguf_int_weights(table), None, device)
            kinds[f"{_qtype(table).name} (tied head)"] += 1
    if kinds:
        model.quantization = "GGUF " + ", ".join(f"{n} x{count}" for n, count in sorted(kinds.items()))
    return model.eval()


def _replace(model: CausalLM, module: str, layer: nn.Module, gguf_path: Path) -> None:
    """Put `layer` where the Linear `module` is, after checking it has the Linear's shape."""
    linear = model.get_submodule(module)
    if (layer.out_features, layer.in_features) != (linear.out_features, linear.in_features):
        raise WeightsError(f"{gguf_path.name}: {module} is {layer.out_features}x{layer.in_features}, "
                           f"expected {linear.out_features}x{linear.in_features}")
    parent, _, attr = module.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layer)
