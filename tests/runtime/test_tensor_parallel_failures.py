"""A tensor-parallel worker that dies or hangs stops the engine with a clear error instead of hanging requests,
and no way of ending the engine (close, SIGTERM, SIGKILL) leaves a worker process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmengine_runtime.runtime import LLM, SamplingParams

PARAMS = SamplingParams(max_new_tokens=4, ignore_eos=True)
REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.slow  # spawns a worker process (seconds)
def test_a_dead_worker_fails_requests_and_stops_the_engine(tiny_dir):
    llm = LLM(tiny_dir("llama-mha"), device="cpu", kv_cache_gib=0.01, tensor_parallel_size=2)
    [pid] = llm.engine.workers.pids
    assert llm.generate([[5, 6, 7]], PARAMS, progress=False)[0].error is None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: llm.engine.failure() is not None, 10)
    assert "rank 1" in llm.engine.failure() and "exit code -9" in llm.engine.failure()
    with pytest.raises(RuntimeError, match="the engine has stopped: tensor-parallel worker"):
        llm.generate([[5, 6, 7]], PARAMS, progress=False)
    llm.close()


@pytest.mark.slow  # spawns a worker process (seconds)
def test_a_worker_dying_mid_step_fails_the_step(tiny_dir):
    """Killed between failure checks: the step's own pipe write or collective notices, the requests finish with
    an error, and the engine stops for good."""
    llm = LLM(tiny_dir("llama-mha"), device="cpu", kv_cache_gib=0.01, tensor_parallel_size=2)
    engine = llm.engine
    [pid] = engine.workers.pids
    engine.add_request([5, 6, 7], PARAMS, request_id="a")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 5)
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "error")]
    assert "tensor-parallel" in outputs[0].error and not engine.has_unfinished()
    assert engine.failure() is not None
    llm.close()


@pytest.mark.slow
def test_a_hung_worker_times_out_instead_of_hanging(tiny_dir):
    llm = LLM(tiny_dir("llama-mha"), device="cpu", kv_cache_gib=0.01, tensor_parallel_size=2, tp_timeout_s=10)
    [pid] = llm.engine.workers.pids
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        [result] = llm.generate([[5, 6, 7]], PARAMS, progress=False)
        assert time.monotonic() - start < 40
        assert result.finish_reason == "error" and "timed out" in result.error
        llm.close()
        assert not alive(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_close_stops_every_worker(tiny_dir):
    llm = LLM(tiny_dir("falcon-40b-like"), device="cpu", kv_cache_gib=0.01, tensor_parallel_size=4)
    pids = llm.engine.workers.pids
    assert len(pids) == 3 and all(alive(pid) for pid in pids)
    llm.close()
    assert not any(alive(pid) for pid in pids)
    llm.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[5]], PARAMS, progress=False)


SCRIPT = """
import sys, time
from llmengine_runtime.runtime import LLM
llm = LLM(sys.argv[1], device="cpu", kv_cache_gib=0.01, tensor_parallel_size=2)
print(*llm.engine.workers.pids, flush=True)
time.sleep(600)
"""


def default_sigint() -> None:
    """In the child before exec: SIGINT handled by default and not blocked (both are inherited across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.slow),
                                 pytest.param(signal.SIGKILL, id="SIGKILL", marks=pytest.mark.slow),
                                 pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow)])
def test_no_orphans_when_the_engine_process_ends(tiny_dir, sig):
    """SIGINT (Ctrl-C) exits through Python's shutdown; SIGTERM and SIGKILL end the process at once, and each
    worker, blocked reading its pipe from rank 0, sees it close and exits."""
    # The fresh-clone run of the whole suite under `make test` timed out here twice: a SIGINT that the pytest worker
    # ignores or blocks is ignored in its children too, and Python then installs no KeyboardInterrupt handler. Give
    # the engine process what a terminal's Ctrl-C finds.
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_dir("llama-mha"))], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=default_sigint)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1 and alive(pids[0])
        proc.send_signal(sig)
        proc.wait(60)  # SIGINT shuts Python down and stops the workers (up to ~10 s; a loaded machine timed out at 20)
        assert wait_until(lambda: not any(alive(pid) for pid in pids), 30), pids
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_script_without_a_main_guard_fails_at_once(tiny_dir, tmp_path):
    """spawn runs the main module again in each worker; without `if __name__ == "__main__":` the worker would start
    an engine of its own and fail, and the engine says so instead of waiting for it to join."""
    script = tmp_path / "unguarded.py"
    script.write_text("from llmengine_runtime.runtime import LLM\n"
                      f"LLM({str(tiny_dir('llama-mha'))!r}, device='cpu', kv_cache_gib=0.01, tensor_parallel_size=2)\n")
    start = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode != 0 and time.monotonic() - start < 60
    assert 'needs `if __name__ == "__main__":`' in run.stderr
