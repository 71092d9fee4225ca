"""Run by test_server_official_batch.py in a subprocess with the official client (scale-llm-engine) first on
PYTHONPATH, as official_client_check.py is: batch jobs (v1 and v2, get, cancel) and models loaded at run
time (Model.create/get/list/delete), through that client unchanged. Prints one JSON line.

    python official_client_batch_check.py MODEL PROMPTS_JSON CHECKPOINT
"""

from __future__ import annotations

import json
import sys
import time

from llmengine import Completion, Model
from llmengine.data_types import CreateBatchCompletionsModelConfig, CreateBatchCompletionsRequestContent
from llmengine.errors import BadRequestError, NotFoundError


def error_name(call) -> str:
    try:
        call()
    except (BadRequestError, NotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def wait_job(job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = Completion.get_batch_completion(job_id)["job"]
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def batch_calls(model: str, prompts: list[str]) -> dict:
    result: dict = {}
    config = CreateBatchCompletionsModelConfig(model=model)
    content = CreateBatchCompletionsRequestContent(prompts=prompts, max_new_tokens=12, temperature=0.0)
    v1 = Completion.batch_create(output_data_path="official/v1.json", model_config=config, content=content)
    result["v1_job"] = wait_job(v1.job_id)

    v2 = Completion.batch_create(output_data_path="official/v2.json", model_config=config, content=content,
                                 use_v2=True)
    result["v2_created"] = json.loads(v2.json())
    result["v2_job"] = wait_job(v2.job_id)

    long = CreateBatchCompletionsRequestContent(prompts=prompts * 50, max_new_tokens=200, temperature=0.0)
    job = Completion.batch_create(output_data_path="official/cancelled.json", model_config=config, content=long,
                                  use_v2=True)
    while Completion.get_batch_completion(job.job_id)["job"]["progress"]["completed"] < 1:
        time.sleep(0.05)
    result["cancel"] = Completion.cancel_batch_completion(job.job_id)
    result["cancelled_job"] = Completion.get_batch_completion(job.job_id)["job"]

    result["s3_output"] = error_name(lambda: Completion.batch_create(
        output_data_path="s3://bucket/out.json", model_config=config, content=content))
    result["escape"] = error_name(lambda: Completion.batch_create(
        output_data_path="../../out.json", model_config=config, content=content))
    result["unknown_job"] = error_name(lambda: Completion.get_batch_completion("batch-unknown"))
    return result


def model_calls(model: str, checkpoint: str) -> dict:
    result: dict = {}
    created = Model.create(name="second", model=model, inference_framework_image_tag="latest",
                           checkpoint_path=checkpoint, max_model_len=512)
    result["created"] = json.loads(created.json())
    statuses = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        statuses.append(Model.get("second").status.value)
        if statuses[-1] != "UPDATE_IN_PROGRESS":
            break
        time.sleep(0.2)
    result["statuses"] = list(dict.fromkeys(statuses))  # in the order seen
    result["listed"] = [e.name for e in Model.list().model_endpoints]
    result["text"] = Completion.create(model="second", prompt=PROMPT, max_new_tokens=8, temperature=0.0).output.text
    result["duplicate"] = error_name(lambda: Model.create(name="second", model=model,
                                                          inference_framework_image_tag="latest",
                                                          checkpoint_path=checkpoint))
    result["outside"] = error_name(lambda: Model.create(name="third", model=model, inference_framework_image_tag="x",
                                                        checkpoint_path="/etc"))
    result["deleted"] = json.loads(Model.delete("second").json())
    result["after_delete"] = error_name(lambda: Model.get("second"))
    result["complete_after_delete"] = error_name(lambda: Completion.create(model="second", prompt="a",
                                                                           max_new_tokens=1, temperature=0.0))
    return result


PROMPT = "Suggest a name for an icecream shop"

if __name__ == "__main__":
    name, prompts, checkpoint = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    print(json.dumps({"batch": batch_calls(name, prompts), "models": model_calls(name, checkpoint)}))
