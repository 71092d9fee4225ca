"""Tensor-parallel worker processes: launched beside the engine (rank 0), one shard of the model each, the same
forward as rank 0 every step, until told to stop.

- `TPWorkers.start(...)` spawns ranks 1..N-1 (torch.multiprocessing, spawn) and joins them with rank 0 in
  torch.distributed: NCCL on CUDA (rank r on cuda:r), gloo on CPU, through a FileStore in a private temporary
  folder. Each collective waits at most `timeout_s`; a hung worker then fails the step instead of hanging it.
- Each worker loads its shard (models/parallel.py), waits for rank 0's block count over its pipe, allocates its
  share of the paged KV cache (its KV heads, the same blocks) and loops: a header on the pipe, the step's inputs
  by broadcast (runtime/tp_step.py), the forward; its hidden states are dropped (only rank 0 computes logits).
- A worker exits when rank 0 says stop, when its pipe closes (rank 0 died), or when a collective fails.
- `close()` stops every worker: the stop message, then terminate and kill for any that linger, so neither an
  engine's close, Ctrl-C, SIGTERM nor a failed step leaves a process behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.models.config import ModelConfig
from llmengine_runtime.models.parallel import TensorParallel, shard_group_size
from llmengine_runtime.runtime.tp_step import (
    STOP,
    TensorParallelError,
    broadcast_payload,
    pack_step,
    payload_size,
    unpack_step,
)

logger = logging.getLogger("runtime")


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker loads and how it joins the group."""

    model_dir: str
    dtype: torch.dtype
    device_type: str  # "cpu" or "cuda"
    quantize: str | None
    group_size: int | None
    block_size: int
    compile: bool
    world_size: int
    init_method: str
    timeout_s: float
    threads: int


def rank_zero(size: int, config: ModelConfig, model_dir: Path, speculative: str | Path | None, quantize: str | None,
              group_size: int | None) -> TensorParallel | None:
    """The engine's TensorParallel (None for one rank), once every size is known to split: before any spawn."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size={size} is out of range: accepted an integer >= 1")
    if size == 1:
        return None
    if speculative not in (None, "ngram"):
        raise ValueError("a draft model does not run under tensor parallelism; use speculative='ngram' or none")
    if quantize == "gguf" or not any(model_dir.glob("*.safetensors")):
        raise ValueError(f"{model_dir}: tensor parallelism reads slices of safetensors weights, not a GGUF's "
                         "integers; use quantize none, int8 or int4 on a folder with safetensors (`llmengine "
                         "convert` makes one from a GGUF)")
    tp = TensorParallel(0, size)
    tp.check(config)
    shard_group_size(config, tp, quantize, group_size)  # ValueError now if the groups do not fit the shards
    return tp


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_group(spec: WorkerSpec, rank: int) -> None:
    dist.init_process_group(backend_for(spec.device_type), init_method=spec.init_method, rank=rank,
                            world_size=spec.world_size, timeout=timedelta(seconds=spec.timeout_s))


def worker_main(rank: int, spec: WorkerSpec, conn: Connection) -> None:
    """A worker process: join the group, load the shard, then run rank 0's steps until stopped."""
    from llmengine_runtime.models.loader import load_model  # here, not at import: the parent already has them
    from llmengine_runtime.runtime.model_runner import ModelRunner

    torch.set_num_threads(spec.threads)
    device = torch.device(f"cuda:{rank}") if spec.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    conn.send("joining")
    init_group(spec, rank)
    try:
        model = load_model(spec.model_dir, spec.dtype, device, progress=False, quantize=spec.quantize,
                           group_size=spec.group_size, tp=TensorParallel(rank, spec.world_size))
        num_blocks = conn.recv()
        runner = ModelRunner(model, num_blocks, spec.block_size, compile_decode=spec.compile)
        with torch.inference_mode():
            while (header := conn.recv_bytes()) != STOP:
                payload = torch.empty(payload_size(header), dtype=torch.int64, device=device)
                runner.forward(*unpack_step(header, broadcast_payload(payload)))
    except EOFError:  # rank 0 is gone
        os._exit(1)
    finally:
        conn.close()
    dist.destroy_process_group()


class TPWorkers:
    """Rank 0's handle on ranks 1..N-1: send each step, notice failures, stop them all."""

    def __init__(self, spec: WorkerSpec, processes: list, conns: list[Connection], store_dir: str):
        self.spec = spec
        self.processes = processes
        self.conns = conns
        self.store_dir = store_dir
        self.failed: str | None = None
        self.closed = False
        self._lock = threading.Lock()

    @classmethod
    def start(cls, model_dir: Path, *, world_size: int, dtype: torch.dtype, device: torch.device,
              quantize: str | None, group_size: int | None, block_size: int, compile: bool,
              timeout_s: float) -> TPWorkers:
        """Spawn ranks 1..world_size-1 and join the group as rank 0 (blocks until every worker joined)."""
        if dist.is_initialized():
            raise RuntimeError("one tensor-parallel engine per process: another one is running here (close it, "
                               "or serve the other model from another process)")
        if device.type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size={world_size} needs {world_size} GPUs; "
                             f"{torch.cuda.device_count()} visible")
        threads = max(1, (os.cpu_count() or 1) // world_size)
        if device.type == "cpu" and torch.get_num_threads() > threads:
            logger.info("tensor parallelism on CPU: %d torch threads per rank", threads)
            torch.set_num_threads(threads)
        store_dir = tempfile.mkdtemp(prefix="llmengine-tp-")
        spec = WorkerSpec(str(model_dir), dtype, device.type, quantize, group_size, block_size, compile,
                          world_size, f"file://{store_dir}/store", timeout_s, torch.get_num_threads())
        ctx = mp.get_context("spawn")
        processes, conns = [], []
        workers = cls(spec, processes, conns, store_dir)
        try:
            for rank in range(1, world_size):
                parent, child = ctx.Pipe()
                process = ctx.Process(target=worker_main, args=(rank, spec, child), name=f"llmengine-tp-{rank}",
                                      daemon=True)
                process.start()
                child.close()
                processes.append(process)
                conns.append(parent)
            workers.wait_for_workers()
            init_group(spec, 0)
        except BaseException:
            workers.close()
            raise
        logger.info("tensor parallelism: %d ranks (%s), worker pids %s", world_size, backend_for(device.type),
                    [p.pid for p in processes])
        return workers

    def wait_for_workers(self) -> None:
        """Until every worker has started and is joining the group; RuntimeError at once if one exited (a script
        without `if __name__ == "__main__":` fails so: spawn runs the main module again in each worker)."""
        deadline = time.monotonic() + self.spec.timeout_s
        for rank, (process, conn) in enumerate(zip(self.processes, self.conns), 1):
            joining = False
            while not joining and process.is_alive() and time.monotonic() < deadline:
                try:
                    joining = conn.poll(0.1) and conn.recv() == "joining"
                except EOFError:  # it exited
                    break
            if not joining:
                process.join(1.0)
                raise RuntimeError(f"tensor-parallel worker rank {rank} failed to start (exit code "
                                   f"{process.exitcode}; its error is above). A script that starts an engine "
                                   "with tensor_parallel_size > 1 needs `if __name__ == \"__main__\":`")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def send(self, message: object) -> None:
        """A Python object to every worker's pipe (the block count, once they have loaded)."""
        try:
            for conn in self.conns:
                conn.send(message)
        except OSError as e:  # a worker that failed to load has closed its pipe
            raise RuntimeError(f"tensor-parallel worker(s) {self.dead_workers()} failed (their error is above)") from e

    def send_step(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Wake the workers with the step's header and broadcast its inputs; TensorParallelError on failure."""
        header, payload = pack_step(input_ids, positions, meta)
        try:
            for conn in self.conns:
                conn.send_bytes(header)
            broadcast_payload(payload)
        except Exception as e:
            raise self.error(e) from e

    def error(self, cause: BaseException) -> TensorParallelError:
        """The error a failed collective or pipe becomes, naming the workers that died; the engine is done."""
        dead = self.dead_workers()
        self.failed = f"tensor-parallel worker(s) {dead} exited" if dead else \
            f"a tensor-parallel collective failed or timed out ({type(cause).__name__}: {cause})"
        return TensorParallelError(self.failed)

    def dead_workers(self) -> list[str]:
        return [f"rank {rank} (pid {p.pid}, exit code {p.exitcode})"
                for rank, p in enumerate(self.processes, 1) if not p.is_alive()]

    def failure(self) -> str | None:
        """Why the group can run no more steps (a worker exited, a collective failed), or None."""
        if self.failed is None and not self.closed and (dead := self.dead_workers()):
            self.failed = f"tensor-parallel worker(s) {dead} exited"
        return self.failed

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker (stop message, then terminate, then kill) and leave the group. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for conn in self.conns:
            try:
                conn.send_bytes(STOP)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout if self.failed is None else 0.5)  # a hung worker will not read its stop
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(2.0)
        for conn in self.conns:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self.store_dir, ignore_errors=True)
