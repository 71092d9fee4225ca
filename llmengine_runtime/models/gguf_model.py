"""Serve a llama-architecture GGUF as it is: its Q4_0 / Q4_1 / Q8_0 projections stay integers.

- `gguf_model_folder(gguf_path, cache_root)`: a model folder holding everything but the weights (config.json and
  the tokenizer files from the GGUF's metadata, written by models/gguf.py's own functions, and gguf_source.json
  naming the GGUF), so the engine, the tokenizer and the server treat a GGUF like any model folder. Made once per
  file (keyed by its path, size and modification time) under `cache_root`, atomically.
- `load_gguf_model(config, gguf_path, dtype, device, keep_quantized)`: the CausalLM with every tensor read from
  the GGUF. With `keep_quantized`, a projection whose parts (q|k|v and gate|up are fused) are all Q4_0/Q4_1
  (-> int4, groups of 32) or all Q8_0 (-> int8, per 32) becomes a QuantizedLinear holding the file's integers
  (models/gguf_quant.py: exact up to the bf16 rounding of the scales on CPU). Everything else (F16 and F32
  tensors, norms, the embedding table for the lookups, fused parts of mixed kinds) is dequantized to `dtype`
  exactly as `llmengine convert` does. A tied head whose embedding is quantized gets `model.quantized_head`
  from the embedding's integers.
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
    gguf_source,
    hf_name,
    read_gguf,
    to_hf_tensor,
    write_atomically,
    write_model_files,
)
from llmengine_runtime.models.gguf_quant import (
    QUANTIZED_TYPES,
    concat_rows,
    gguf_int_weights,
    quantized_linear,
    rotary_heads_for,
)
from llmengine_runtime.models.layers import Linear
from llmengine_runtime.models.loader import WeightsError

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


def quantized_projections(model: CausalLM, tensors: dict[str, object]) -> dict[str, list[str]]:
    """{module name: its weights' checkpoint names in row order} for every Linear whose parts all map to one
    integer kind. `tensors`: checkpoint (HF) name -> GGUFReader tensor."""
    module_of = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters()}
    parts: dict[str, list[tuple[int, str]]] = {}
    for name, target in model.checkpoint_targets().items():
        module = module_of[id(target.param)]
        if name.endswith(".weight") and isinstance(model.get_submodule(module), Linear) and name in tensors:
            parts.setdefault(module, []).append((target.row_start, name))
    groups = {}
    for module, rows in parts.items():
        kinds = {_kind(GGMLQuantizationType(tensors[name].tensor_type)) for _, name in rows}
        if len(kinds) == 1 and None not in kinds:
            groups[module] = [name for _, name in sorted(rows)]
    return groups


def load_gguf_model(config: ModelConfig, gguf_path: str | Path, dtype: torch.dtype, device: str | torch.device,
                    keep_quantized: bool = True, progress: bool = True) -> CausalLM:
    """A CausalLM filled from a llama GGUF; see the module docstring. Sets `model.quantization` to what it kept."""
    gguf_path = Path(gguf_path)
    reader = GGUFReader(gguf_path)
    tensors = {hf_name(t.name): t for t in reader.tensors if t.name not in SKIPPED_TENSORS}
    heads = {"num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads}
    with torch.device("meta"):
        model = CausalLM(config)
    groups = quantized_projections(model, tensors) if keep_quantized else {}
    for module in groups:  # no float copy of what stays quantized: an empty weight until it is replaced
        linear = model.get_submodule(module)
        linear.weight = nn.Parameter(torch.empty(0, linear.in_features, device="meta"), requires_grad=False)
    model = model.to_empty(device=device).to(dtype)
    model.init_buffers(device)

    targets = model.checkpoint_targets()
    kept = {name for names in groups.values() for name in names}
    unexpected = sorted(set(tensors) - set(targets))
    missing = sorted(set(targets) - set(tensors))
    if unexpected or missing:
        raise WeightsError(f"{gguf_path.name}: tensors without a place in the model {unexpected[:5]}, "
                           f"places without a tensor {missing[:5]}")
    with torch.no_grad():
        for name in tqdm(sorted(set(targets) - kept), desc=f"loading {gguf_path.name}", unit="tensor",
                         disable=not progress):
            dest = targets[name].view()
            array = to_hf_tensor(tensors[name], heads)
            if tuple(array.shape) != tuple(dest.shape):
                raise WeightsError(f"{gguf_path.name}: {name} has shape {array.shape}, expected {tuple(dest.shape)}")
            dest.copy_(torch.from_numpy(array if array.flags.writeable else array.copy()))  # F32: a view of the file
        kinds: Counter[str] = Counter()
        for module, names in groups.items():
            parts = [gguf_int_weights(tensors[n], rotary_heads_for(tensors[n].name, heads)) for n in names]
            linear = model.get_submodule(module)
            layer = quantized_linear(concat_rows(parts), linear.bias, device)
            if (layer.out_features, layer.in_features) != (linear.out_features, linear.in_features):
                raise WeightsError(f"{gguf_path.name}: {module} is {layer.out_features}x{layer.in_features}, "
                                   f"expected {linear.out_features}x{linear.in_features}")
            parent, _, attr = module.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
            kinds.update(GGMLQuantizationType(tensors[n].tensor_type).name for n in names)
        table = tensors[EMBEDDING]
        if keep_quantized and config.tie_word_embeddings and _kind(GGMLQuantizationType(table.tensor_type)):
            model.quantized_head = quantized_linear(gguf_int_weights(table), None, device)
            kinds[f"{GGMLQuantizationType(table.tensor_type).name} (tied head)"] += 1
    if kinds:
        model.quantization = "GGUF " + ", ".join(f"{n} x{count}" for n, count in sorted(kinds.items()))
    return model.eval()
