"""Confining request paths to a directory the operator named (`--batch-dir`, `--models-dir`).

A path from a request is taken relative to the allowed directory unless absolute, resolved with
os.path.realpath (so `..` and symlinks are followed), and accepted only if the result is still inside
the directory. URLs (`s3://`, `http://`, `file://`, ...) are refused: this server reads and writes local
files only. Every refusal is a 400 naming the path and the allowed directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmengine_runtime.server.errors import ApiError

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
MAX_INPUT_BYTES = 64 * 1024 * 1024


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/llmengine`, else ~/.cache/llmengine (where the models folder lives too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmengine"


def confine(path: object, root: Path, what: str) -> Path:
    """The resolved `path` if it lies inside `root`; ApiError(400) naming both otherwise."""
    where = f"give a path under {root} (relative paths are taken under it)"
    if not isinstance(path, str) or not path.strip():
        raise ApiError(400, f"{what} is missing or empty: {where}")
    if "\x00" in path:
        raise ApiError(400, f"{what} {path!r} contains a NUL byte: {where}")
    if URL.match(path):
        raise ApiError(400, f"{what} {path!r} is a URL; this server reads and writes only local files: {where}")
    root_real = Path(os.path.realpath(root))
    candidate = path if os.path.isabs(path) else os.path.join(root_real, path)
    resolved = Path(os.path.realpath(candidate))
    if not resolved.is_relative_to(root_real):
        raise ApiError(400, f"{what} {path!r} is outside the allowed directory {root} (after resolving '..' and "
                            f"symlinks): {where}")
    return resolved


def input_file(path: object, root: Path, what: str = "input_data_path", limit: int | None = None) -> Path:
    """An existing regular file inside `root`, at most `limit` bytes (default MAX_INPUT_BYTES)."""
    limit = MAX_INPUT_BYTES if limit is None else limit
    resolved = confine(path, root, what)
    if not resolved.is_file():
        raise ApiError(400, f"{what} {path!r} is not a file under {root}")
    size = resolved.stat().st_size
    if size > limit:
        raise ApiError(400, f"{what} {path!r} is {size} bytes; the limit is {limit} bytes")
    return resolved


def output_file(path: object, root: Path, what: str = "output_data_path") -> Path:
    """A file path inside `root` that is not a directory (it may not exist yet)."""
    resolved = confine(path, root, what)
    if resolved == Path(os.path.realpath(root)) or resolved.is_dir():
        raise ApiError(400, f"{what} {path!r} is a directory; name a file under {root}")
    return resolved


def checkpoint(path: object, root: Path, what: str = "checkpoint_path") -> Path:
    """A model folder (config.json + *.safetensors) or a .gguf file inside `root`."""
    resolved = confine(path, root, what)
    if resolved.is_file() and resolved.suffix.lower() == ".gguf":
        return resolved
    if resolved.is_dir() and (resolved / "config.json").is_file() and any(resolved.glob("*.safetensors")):
        return resolved
    kind = "a model folder (config.json + *.safetensors) or a .gguf file"
    if not resolved.exists():
        raise ApiError(400, f"{what} {path!r} does not exist under {root}; give {kind}")
    raise ApiError(400, f"{what} {path!r} is not {kind}")
