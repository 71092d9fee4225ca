"""The model families: one entry each, naming what a family brings (docs/architecture.md, "Model families").

A family is one file (models/<family>.py) that provides a `Family` (models/family_entry.py): the HF architecture
names and model types it serves, how its config.json becomes a ModelConfig, its decoder block, its final norm, its
checkpoint names (safetensors) and how a GGUF of its `general.architecture` maps onto those (models/gguf.py).
Adding a family is that file plus one line in `FAMILIES` below; parse_config (models/config.py), CausalLM and the
GGUF paths look it up here.
"""

from __future__ import annotations

from typing import Any

from llmengine_runtime.models import falcon, llama, mistral, qwen2, qwen3
from llmengine_runtime.models.family_entry import Family
from llmengine_runtime.models.model_config import ConfigError

FAMILIES: list[Family] = [llama.FAMILY, falcon.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY]  # the registry


def families() -> list[Family]:
    """Every family, in registry order."""
    return FAMILIES


def family(name: str) -> Family:
    """The family of `ModelConfig.arch`."""
    for f in families():
        if f.name == name:
            return f
    raise ConfigError(f"unknown model family {name!r}; known: {[f.name for f in families()]}")


def family_for(raw: dict[str, Any]) -> Family:
    """The family serving an HF config.json dict: by its `architectures`, else (none listed) its `model_type`."""
    architectures = set(raw.get("architectures") or [])
    model_type = raw.get("model_type")
    for f in families():
        if architectures & f.architectures or (not architectures and model_type in f.model_types):
            return f
    supported = sorted(a for f in families() for a in f.architectures)
    raise ConfigError(f"unsupported architecture {sorted(architectures) or model_type!r}; supported: {supported}")


def gguf_family(meta: dict) -> Family:
    """The family of a GGUF's metadata (`general.architecture`; a "llama" file that is a Mistral is Mistral's)."""
    arch = meta.get("general.architecture")
    matches = [f for f in families() if f.gguf is not None and f.gguf.architecture == arch]
    if not matches:
        known = sorted({f.gguf.architecture for f in families() if f.gguf is not None})
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {known})")
    name = str(meta.get("general.name") or "").lower()
    if arch == "llama" and (f"{arch}.attention.sliding_window" in meta or "mistral" in name):
        return family("mistral")
    return next(f for f in matches if f.name != "mistral") if len(matches) > 1 else matches[0]
