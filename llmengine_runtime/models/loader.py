"""Load a model folder's safetensors (one file or sharded) into a CausalLM: memory-mapped, cast, checked."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.models.config import ModelConfig, load_config
from llmengine_runtime.models.float_linear import float_weights, float_weights_apply
from llmengine_runtime.models.huge_pages import move_to_huge_pages
from llmengine_runtime.models.packed_linear import can_pack
from llmengine_runtime.models.parallel import TensorParallel, shard_group_size
from llmengine_runtime.models.quantized_linear import QuantizedLinear, quantize_model
from llmengine_runtime.models.weights import WeightsError

# Tensors some checkpoints carry that hold nothing we need.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"`: the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The shards listed by model.safetensors.index.json, else every *.safetensors file in the folder."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"shards listed in {index} are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else "no such folder"
        raise WeightsError(f"no *.safetensors weights in {model_dir} (found: {found}); "
                           "weights are loaded only from safetensors (convert GGUF with `llmengine convert`)")
    return files


def load_weights(model: CausalLM, model_dir: Path, progress: bool = True) -> dict[str, int]:
    """Copy every checkpoint tensor into its target; every target must be filled exactly once. A target with a
    `read` (a tensor-parallel rank's part) reads only that part of the file. Returns the bytes read per tensor."""
    targets = model.checkpoint_targets()
    files = safetensors_files(model_dir)
    names = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.update({name: path for name in f.keys()})
    unexpected = sorted(n for n in names if n not in targets and not IGNORED.search(n)
                        and not (n == "lm_head.weight" and model.config.tie_word_embeddings))
    if unexpected:
        raise WeightsError(f"unexpected tensors in {model_dir}: {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''} (does config.json match the weights?)")
    missing = sorted(set(targets) - set(names))
    if missing:
        raise WeightsError(f"missing tensors in {model_dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    bar = tqdm(total=len(targets), desc=f"loading {model_dir.name}", unit="tensor", disable=not progress)
    bytes_read: dict[str, int] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                target = targets.get(name)
                if target is None:
                    continue
                tensor = f.get_tensor(name) if target.read is None else target.read(f.get_slice(name))
                bytes_read[name] = tensor.numel() * tensor.element_size()
                if target.transform is not None:
                    tensor = target.transform(tensor)
                dest = target.view()
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise WeightsError(f"tensor {name} in {path.name} has shape {tuple(tensor.shape)}, "
                                       f"expected {tuple(dest.shape)} from config.json")
                dest.copy_(tensor)
                bar.update(1)
    bar.close()
    return bytes_read


QUANTIZE_MODES = ("none", "int8", "int4", "gguf", "auto")


def gguf_mixtures() -> tuple[str, ...]:
    """The llama-quantize file types `quantize` also takes ("q4_k_m", "q8_0", ...: models/gguf_quantize_mix.py)."""
    from llmengine_runtime.models.gguf_quantize_mix import MIXTURES  # imports gguf: only when asked

    return MIXTURES


def resolve_quantize(quantize: str | None, model_dir: Path, device: str | torch.device) -> str | None:
    """None, "int8", "int4", "gguf" or a GGUF mixture name for a `quantize` argument. "auto": "gguf" on CPU when
    the folder records the GGUF it came from (gguf_source.json, written by `llmengine convert`), else None."""
    if isinstance(quantize, str) and quantize.lower() in gguf_mixtures():
        return quantize.lower()
    if quantize not in (None, *QUANTIZE_MODES):
        raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE_MODES)} "
                         f"or a llama-quantize type: {', '.join(gguf_mixtures())}")
    if quantize == "auto":
        from llmengine_runtime.models.gguf import gguf_source

        cpu = torch.device(device).type == "cpu"
        return "gguf" if cpu and gguf_source(model_dir) is not None else None
    return None if quantize == "none" else quantize


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               progress: bool = True, config: ModelConfig | None = None, pack: bool | None = None,
               quantize: str | None = None, group_size: int | None = None,
               tp: TensorParallel | None = None) -> CausalLM:
    """Build the model that `model_dir/config.json` describes and fill it from its safetensors, or from the GGUF
    that its gguf_source.json names when it has no safetensors (a GGUF served directly: models/gguf_model.py).

    `quantize` (weight-only; activations stay `dtype`): None or "none": float weights; "int8" (per output
    channel, or per `group_size` columns) or "int4" (groups of `group_size`, default 64 or 32): the float weights
    quantized at load (models/quantized_linear.py `quantize_model`, the head too); "gguf": the integers of the
    folder's GGUF as they are (Q4_0/Q4_1 -> int4 g32, Q8_0 -> int8 g32; other tensors float); "auto": "gguf" on
    CPU for a folder that came from a GGUF, else float. A llama-quantize type ("q4_k_m", "q5_k_m", "q6_k",
    "q8_0", "q4_0", ...: models/gguf_quantize_mix.py MIXTURES): the float weights quantized at load to the bytes
    and per-tensor types llama-quantize writes (models/gguf_quantize_model.py); these are the llama.cpp-compatible
    choices, while int8/int4 stay our own schemes. `model.quantization` says what was done.
    On the CPU, bf16 and fp16 float weights stay in that dtype in our C++ product's layout while the rest of the
    model computes in fp32 (models/float_linear.py; LLMENGINE_FLOAT_WEIGHTS=0 keeps the eager bf16/fp16 model).
    `pack`: move the float projection weights to oneDNN's packed layout (models/packed_linear.py); by default
    wherever that is possible (CPU, fp32 or bf16). A packed model's Linear weights are on the meta device.
    On CPU the weights then move onto huge pages (models/huge_pages.py).
    `tp`: load only this tensor-parallel rank's shard (models/parallel.py), from safetensors slices; "auto"
    then means float weights (a GGUF's integers are not sharded) and int8/int4 quantize the rank's slices.
    """
    model_dir = Path(model_dir)
    config = config or load_config(model_dir)
    torch_dtype = parse_dtype(dtype)
    mode = resolve_quantize(None if tp is not None and quantize == "auto" else quantize, model_dir, device)
    from_gguf = mode == "gguf" or not any(model_dir.glob("*.safetensors"))
    if tp is not None and from_gguf:
        raise WeightsError(f"{model_dir}: tensor parallelism reads slices of safetensors weights, not a GGUF's "
                           "integers; use quantize none, int8 or int4 on a folder with safetensors (`llmengine "
                           "convert` makes one from a GGUF)")
    if from_gguf:
        from llmengine_runtime.models.gguf import SOURCE_RECORD, gguf_source  # gguf and numpy: only when a GGUF is read
        from llmengine_runtime.models.gguf_model import load_gguf_model

        source = gguf_source(model_dir)
        if source is None and (mode == "gguf" or (model_dir / SOURCE_RECORD).is_file()):
            raise WeightsError(f"{model_dir}: the GGUF that {SOURCE_RECORD} names is missing or has changed size")
        from_gguf = source is not None
    if from_gguf:
        model = load_gguf_model(config, source, torch_dtype, device, keep_quantized=mode == "gguf",
                                progress=progress)
    else:
        with torch.device("meta"):
            model = CausalLM(config, tp)
        model = model.to_empty(device=device).to(torch_dtype)
        model.init_buffers(device)  # computed tables were made on meta too
        with torch.no_grad():
            load_weights(model, model_dir, progress)
    if mode not in (None, "gguf", "int8", "int4"):  # a llama-quantize mixture, from the float weights
        if tp is not None:
            raise WeightsError(f"{model_dir}: quantize={mode} quantizes whole float weights, not a rank's shard")
        from llmengine_runtime.models.gguf_quantize_model import quantize_model_gguf

        quantize_model_gguf(model, mode, progress)
    if mode in ("int8", "int4"):
        if tp is not None:
            group_size = shard_group_size(config, tp, mode, group_size)
        quantize_model(model, mode, group_size)
        group = next(m for m in model.modules() if isinstance(m, QuantizedLinear)).group_size
        model.quantization = "int8 per channel" if mode == "int8" and group_size is None else f"{mode} g{group}"
    if (mode is None and tp is None and os.environ.get("LLMENGINE_FLOAT_WEIGHTS", "1") != "0"
            and float_weights_apply(model, torch_dtype)):
        float_weights(model, torch_dtype)  # models/float_linear.py: the C++ step runs it; activations fp32
        model.quantization = f"{str(torch_dtype).removeprefix('torch.')} weights, fp32 activations"
        pack = False
    if pack is None:
        pack = torch.device(device).type == "cpu" and can_pack(torch_dtype)
    if pack:
        model.use_packed_weights()
    if torch.device(device).type == "cpu":
        move_to_huge_pages(model)  # models/huge_pages.py: decoding reads them ~20% faster on 2 MiB pages
    return model.eval()

