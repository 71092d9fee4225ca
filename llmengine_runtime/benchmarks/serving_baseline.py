"""The serving benchmark's second server, the baseline (e.g. vLLM CPU): its settings as a client sees them, its
launch (an arbitrary command with its own environment, run from outside the repo) and stop, its readiness, and
the model name it serves.

`--launch-baseline "VLLM_CPU_KVCACHE_SPACE=2 .cache/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server
--model FOLDER --port {port}"` is split as a shell would (shlex): leading NAME=VALUE words go into the environment,
`{port}` becomes a free port (and the baseline's URL), and a word naming an existing relative path is made absolute,
since the command runs in a scratch folder outside the repo (a `vllm` or `llmengine_runtime` folder in the current
directory would otherwise shadow the installed packages).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def baseline_args(args: argparse.Namespace, model: str) -> argparse.Namespace:
    """The client settings for the baseline: our run's settings with its URL, the OpenAI route (the only one vLLM
    has), its model name and no API key."""
    return argparse.Namespace(**{**vars(args), "base_url": args.baseline_url, "api": "openai", "model": model,
                                 "api_key": None})


def served_model(base_url: str) -> str | None:
    """The first model id that GET /v1/models lists, or None when the server does not answer it."""
    try:
        response = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10)
        data = response.json().get("data") if response.status_code == 200 else None
        return data[0]["id"] if data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError):
        return None


def is_ready(base_url: str) -> bool:
    """Ready when /readyz answers 200, or, on a server without /readyz (404: vLLM), when /health does."""
    base = base_url.rstrip("/")
    try:
        status = httpx.get(base + "/readyz", timeout=5).status_code
        if status == 404:
            status = httpx.get(base + "/health", timeout=5).status_code
        return status == 200
    except httpx.HTTPError:
        return False


def wait_baseline_ready(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not is_ready(base_url):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the baseline server exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the baseline at {base_url} is not ready after {timeout:.0f} s")
        time.sleep(1.0)


def split_command(command: str, port: int, cwd: Path) -> tuple[list[str], dict[str, str]]:
    """The command's words (with {port} filled in and existing relative paths made absolute) and the extra
    environment its leading NAME=VALUE words set."""
    words = shlex.split(command.replace("{port}", str(port)))
    env: dict[str, str] = {}
    while words and ASSIGNMENT.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if not words:
        raise ValueError(f"--launch-baseline has no command: {command!r}")
    # absolute, not resolved: a venv's bin/python is a symlink to the base interpreter, which lacks the venv's packages
    absolute = [os.path.normpath(cwd / w) if not w.startswith("-") and not os.path.isabs(w) and "/" in w
                and (cwd / w).exists() else w for w in words]
    return absolute, env


def launch_baseline(args: argparse.Namespace, log_path: Path, port: int) -> subprocess.Popen:
    """Start --launch-baseline in a scratch folder, in a session of its own (so that stop_baseline ends its
    workers too), output to `log_path`."""
    command, env = split_command(args.launch_baseline, port, Path.cwd())
    workdir = tempfile.mkdtemp(prefix="serving-baseline-")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shown = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command)])
    print(f"launching the baseline: {shown} (cwd {workdir}, log: {log_path})", file=sys.stderr)
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, **env}, start_new_session=True)
    proc.workdir = workdir  # removed by stop_baseline
    return proc


def stop_baseline(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM to the baseline's process group, SIGKILL to it after `timeout` s; then its scratch folder goes."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    if getattr(proc, "workdir", None):
        shutil.rmtree(proc.workdir, ignore_errors=True)


def add_baseline_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("baseline: a second server run side by side (OpenAI route)")
    group.add_argument("--baseline-url", default=None,
                       help="a second server's base URL; every level runs against it after ours (interleaved)")
    group.add_argument("--baseline-name", default="baseline", help="its name in the report, e.g. 'vLLM CPU 0.32'")
    group.add_argument("--baseline-model", default=None,
                       help="the model name it serves (default: the first of its /v1/models, else --model)")
    group.add_argument("--launch-baseline", default=None, metavar="COMMAND",
                       help="start this command as the baseline and stop it after: NAME=VALUE words first set its "
                            "environment, {port} becomes a free port (the baseline's URL unless --baseline-url); "
                            "run from a scratch folder outside the repo")
    group.add_argument("--baseline-launch-timeout", type=float, default=900.0)
