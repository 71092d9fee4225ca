"""Random-weight checkpoints at a zoo model's real shapes, for speed runs without the real weights.

Decode speed does not depend on the weight values, only on their shapes and dtype. The checkpoint is written
the way transformers writes one (its config.json, HF tensor names, safetensors shards), so our loader and
transformers' `from_pretrained` read the same weights. It has no tokenizer: prompts are token ids.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

SHARD_BYTES = 2 << 30


def random_config(name: str, num_layers: int | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """The zoo entry's HF config dict, with fewer layers and any other fields changed."""
    from llmengine_runtime.models.zoo import ZOO

    if name not in ZOO:
        raise ValueError(f"random weights need a zoo name; {name!r} is not one of {sorted(ZOO)}")
    config = dict(ZOO[name].config)
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    config.update(overrides or {})
    return config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["hidden_size=64", "tie_word_embeddings=true"]` -> {"hidden_size": 64, "tie_word_embeddings": True}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad override {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def checkpoint_dir(root: Path, name: str, config: dict, seed: int) -> Path:
    digest = hashlib.sha1(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()[:10]
    return root / f"{name}-random-{config['num_hidden_layers']}L-{digest}"


def make_random_checkpoint(config: dict, folder: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config.json + random safetensors (N(0, 0.02), norms 1, biases 0) into folder; reused if complete."""
    import transformers
    from safetensors.torch import save_file

    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):  # names and shapes only; nothing allocated
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    hf_config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    files: list[tuple[str, list[str]]] = []

    def flush() -> None:
        filename = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        files.append((filename, list(shard)))
        shard.clear()

    for name, shape in shapes.items():
        if "norm" in name or "ln_" in name:
            tensor = torch.ones(shape, dtype=dtype) if name.endswith("weight") else torch.zeros(shape, dtype=dtype)
        elif name.endswith("bias"):
            tensor = torch.zeros(shape, dtype=dtype)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        shard[name] = tensor
        if sum(t.numel() * t.element_size() for t in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    if len(files) == 1:
        (folder / files[0][0]).rename(folder / "model.safetensors")
    else:
        weight_map = {name: filename for filename, names in files for name in names}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    done.touch()
    return folder


def resolve_folder(args) -> tuple[Path, bool]:
    """(model folder, random weights?) for --model: real weights unless asked for random ones or absent."""
    from llmengine_runtime.models.zoo import ZOO, ModelNotFoundError, resolve_model

    wants_random = args.random_weights or args.num_layers is not None or args.override
    if not wants_random:
        try:
            return Path(resolve_model(args.model)), False
        except ModelNotFoundError:
            if args.model not in ZOO:
                raise
            print(f"{args.model}: no weights on this machine; using random weights at its shapes", file=sys.stderr)
    config = random_config(args.model, args.num_layers, parse_overrides(args.override))
    folder = checkpoint_dir(Path(args.out_dir) / "models", args.model, config, args.seed)
    return make_random_checkpoint(config, folder, seed=args.seed), True
