"""`llmengine generate` on a tiny model folder: a completion, and a clean one-line error for an empty prompt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models.tiny import VOCAB, save_tiny

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # a model load in-process and one in a subprocess: ~10 s each on 2 cores


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama with a word-level tokenizer over its 128 ids: a folder the CLI can serve."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = save_tiny("llama-mha", tmp_path_factory.mktemp("tiny-llama"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return folder


def test_generate_completes_on_the_tiny_folder(tiny_folder, capsys):
    from llmengine_runtime.cli import main

    rc = main(["generate", "--model", str(tiny_folder), "--prompt", "w5 w6 w7", "--max-new-tokens", "4",
               "--dtype", "float32", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.strip()  # four greedy tokens of a random model: words, whatever they are


def test_generate_empty_prompt_is_a_one_line_error(tiny_folder):
    run = subprocess.run([sys.executable, "-m", "llmengine_runtime.cli", "generate", "--model", str(tiny_folder),
                          "--prompt", ""], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 1
    assert run.stdout == ""
    message = "llmengine generate: error: --prompt is empty: give the text to complete"
    assert run.stderr.strip().splitlines() == [message]
    assert "Traceback" not in run.stderr


def test_generate_on_two_ranks_prints_what_one_rank_prints(tiny_folder, capsys):
    """`python -m llmengine_runtime.cli generate --tensor-parallel-size 2`: the spawned worker imports the main module
    again without running it, and the greedy completion is one rank's."""
    from llmengine_runtime.cli import main

    args = ["generate", "--model", str(tiny_folder), "--prompt", "w5 w6 w7", "--max-new-tokens", "6",
            "--dtype", "float32", "--device", "cpu"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    run = subprocess.run([sys.executable, "-m", "llmengine_runtime.cli", *args, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == expected
