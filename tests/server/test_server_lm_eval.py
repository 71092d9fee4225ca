"""EleutherAI's lm-evaluation-harness as a client: `local-completions` with batch size 4 against the live server
scores a tiny local task (multiple choice and rolling perplexity, written here) exactly as lm-eval's own `hf`
backend scores it on the same folder: the same accuracy, per-item log-likelihoods within 1e-4, perplexity within
1e-4 relative. Batches of prompts, echo with log-probs and token-id prompts are what lm-eval sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # transformers and our server on the default model, lm-eval twice

MC = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Madrid"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" five", " four", " seven"], "answer": 1},
    {"question": "The colour of the clear sky is", "choices": [" green", " red", " blue"], "answer": 2},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin", " Rankine"], "answer": 0},
    {"question": "A baby cat is called a", "choices": [" puppy", " kitten", " calf"], "answer": 1},
]
TEXTS = [
    {"text": "The quick brown fox jumps over the lazy dog. It was a sunny day, and the dog did not mind."},
    {"text": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"},
]
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
PPL_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows, yaml in (("tiny_mc", MC, MC_YAML), ("tiny_ppl", TEXTS, PPL_YAML)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(yaml.format(data=data))
    return folder


def evaluate(model: str, model_args: str, tasks_dir: Path) -> dict:
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    return evaluator.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc", "tiny_ppl"],
                                     batch_size=4, device="cpu", log_samples=True,
                                     task_manager=TaskManager(include_path=str(tasks_dir)))


def item_log_likelihoods(results: dict, task: str) -> list[float]:
    values = []
    for sample in results["samples"][task]:
        for resp in sample["filtered_resps"]:
            values.append(float(resp[0]) if isinstance(resp, (list, tuple)) else float(resp))
    return values


def test_local_completions_scores_as_the_hf_backend(llm_server, default_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks_dir = write_tasks(tmp_path / "tasks")
    from tests.server.live_server import MODEL

    ours = evaluate("local-completions", f"model={MODEL},base_url={llm_server.url}/v1/completions,"
                    f"tokenizer={default_model_dir},tokenizer_backend=huggingface,max_retries=1", tasks_dir)
    hf = evaluate("hf", f"pretrained={default_model_dir},dtype=float32", tasks_dir)
    assert ours["results"]["tiny_mc"]["acc,none"] == hf["results"]["tiny_mc"]["acc,none"]
    for task in ("tiny_mc", "tiny_ppl"):
        got, want = item_log_likelihoods(ours, task), item_log_likelihoods(hf, task)
        assert len(got) == len(want) > 0
        assert got == pytest.approx(want, abs=1e-4)
    assert ours["results"]["tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["tiny_ppl"]["word_perplexity,none"], rel=1e-4)
