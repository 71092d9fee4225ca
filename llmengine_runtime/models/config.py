"""Model configuration read from a Hugging Face config.json: `parse_config` and `load_config` hand it to the family
that serves its architecture (models/families.py); ModelConfig itself is models/model_config.py's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmengine_runtime.models.model_config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig", "load_config", "parse_config"]


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from the dict of an HF config.json; unsupported models raise ConfigError. Which family parses
    it is models/families.py's registry (by `architectures`, else by `model_type`)."""
    from llmengine_runtime.models.families import family_for  # (torch and the blocks only when a config is parsed)

    return family_for(raw).parse(raw)


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}")
    return parse_config(json.loads(path.read_text()))
