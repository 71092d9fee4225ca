"""resolve_model on folders it cannot load: each refusal says what it found and what to do, and pickled
weights are recognised by name, never opened."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from llmengine_runtime.models.zoo import ModelNotFoundError, resolve_model


class _Tripwire:
    """Unpickling this creates a folder: proof that something opened the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def pickle_folder(path: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (path / name).write_bytes(pickle.dumps(_Tripwire(marker)))
    return path


def assert_pickle_message(message: str, folder: Path, file: str = "pytorch_model.bin") -> None:
    assert f"{folder} holds pickle weights ({file})" in message
    assert "safetensors or GGUF" in message and "llmengine convert" in message and "transformers" in message
    assert "not a zoo name" not in message and "--model" not in message


def test_pickle_only_folder_by_path(tmp_path):
    folder = pickle_folder(tmp_path / "model", tmp_path / "unpickled")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(folder)
    assert_pickle_message(str(info.value), folder)
    assert not (tmp_path / "unpickled").exists()


def test_pickle_only_folder_by_name_equals_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMENGINE_MODELS_DIR", str(tmp_path / "models"))
    folder = pickle_folder(tmp_path / "model", tmp_path / "unpickled", "model.pt")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("mine", {"mine": folder})
    assert str(info.value).startswith("model 'mine': ")
    assert_pickle_message(str(info.value), folder, "model.pt")
    assert not (tmp_path / "unpickled").exists()


def test_zoo_name_whose_hf_snapshot_holds_pickle_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMENGINE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    root = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf"
    snapshot = pickle_folder(root / "snapshots" / "abc123", tmp_path / "unpickled")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("abc123")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("llama-2-7b")
    assert_pickle_message(str(info.value), snapshot)
    assert not (tmp_path / "unpickled").exists()


def test_gguf_file_is_served_and_folder_points_to_it(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # a GGUF file is served as it is (tests/models/test_gguf_model.py); this one is broken
    with pytest.raises(ModelNotFoundError, match=r"model\.gguf is not a llama GGUF we can serve"):
        resolve_model(gguf)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"holds a GGUF file \(m\.gguf\).*NAME=.*m\.gguf.*llmengine convert"):
        resolve_model(folder)


def test_empty_folder_names_what_is_missing(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json and no \\*.safetensors weights"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="has no \\*.safetensors weights \\(it needs"):
        resolve_model(tmp_path)
