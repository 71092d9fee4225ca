"""Tensor parallelism, Megatron style: which heads and rows each rank holds, how it reads them, and the all-reduce.

With N ranks, rank r holds
- with at least N KV heads: KV heads `[r n_kv // N, (r+1) n_kv // N)` and the query heads of their groups (whole
  groups; uneven when N does not divide n_kv: SmolLM2's 3 KV heads on 2 ranks are 1 + 2 groups); with fewer (MQA,
  few KV groups; N must be a multiple of n_kv): query heads `[r H/N, (r+1) H/N)` and the one KV head of their
  group, replicated on N/n_kv ranks;
- rows `[r I // N, (r+1) I // N)` of the MLP's intermediate dimension.
Column-parallel projections (fused QKV, gate/up, Falcon's dense_h_to_4h) keep those output rows, so attention and
the activation run on the rank's part alone; row-parallel ones (o_proj, down_proj, Falcon's dense and dense_4h_to_h)
keep the matching input columns and give partial sums, which `RowParallel` all-reduces before adding the bias once.
The embedding, the norms and the head are replicated: a vocabulary of 32-150k rows is a small part of the weights
next to the layers, and replicated they need no gather (only rank 0 computes logits).

Each rank reads only its slices of the checkpoint (`safe_open(...).get_slice(name)`): `ParamTarget.read`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmengine_runtime.models.model_config import ModelConfig

Reader = Callable[[Any], torch.Tensor]  # a safetensors slice -> this rank's part of the tensor


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among `world_size` ranks (rank 0 runs the scheduler and computes logits)."""

    rank: int
    world_size: int

    def check(self, config: ModelConfig) -> None:
        """ValueError naming what `world_size` cannot split."""
        n, h, h_kv = self.world_size, config.num_heads, config.num_kv_heads
        if h_kv >= n:
            return
        if n % h_kv or (h // h_kv) % (n // h_kv):
            raise ValueError(f"tensor_parallel_size={n} cannot split {h} attention heads in {h_kv} KV groups: with "
                             f"fewer KV heads than ranks, each KV head is replicated on N / {h_kv} ranks, so N must "
                             f"be a multiple of {h_kv} that divides the {h // h_kv} query heads of each group")

    def part(self, size: int) -> tuple[int, int]:
        """This rank's `[start, stop)` of a dimension split as evenly as whole units allow (the later ranks take
        the extra ones: rank 0 also schedules and samples)."""
        return self.rank * size // self.world_size, (self.rank + 1) * size // self.world_size

    def kv_heads(self, config: ModelConfig) -> tuple[int, int]:
        """This rank's KV heads: a share of them, or (fewer KV heads than ranks) one, replicated on N/n_kv ranks."""
        h_kv = config.num_kv_heads
        if h_kv >= self.world_size:
            return self.part(h_kv)
        kv = self.rank // (self.world_size // h_kv)
        return kv, kv + 1

    def heads(self, config: ModelConfig) -> tuple[int, int]:
        """This rank's query heads: the whole groups of its KV heads, or its share of its replicated KV head's."""
        if config.num_kv_heads >= self.world_size:
            group = config.num_heads // config.num_kv_heads
            kv_start, kv_stop = self.kv_heads(config)
            return kv_start * group, kv_stop * group
        return self.part(config.num_heads)

    def shard_config(self, config: ModelConfig) -> ModelConfig:
        """The sizes of this rank's modules and KV cache: its heads and its part of the MLP."""
        self.check(config)
        (h0, h1), (k0, k1), (i0, i1) = self.heads(config), self.kv_heads(config), self.part(config.intermediate_size)
        return replace(config, num_heads=h1 - h0, num_kv_heads=k1 - k0, intermediate_size=i1 - i0)


def shard_group_size(config: ModelConfig, tp: TensorParallel, mode: str | None, group_size: int | None) -> int | None:
    """The int8/int4 group size for quantizing every rank's slices: `group_size`, or for int4 the largest of 64, 32
    that fits the whole model's inputs and each rank's (so every rank makes the groups one rank would make).
    ValueError unless it divides the K inputs a row-parallel projection keeps on each rank: each group then lies
    whole on one rank. int8 per output channel (no group size) fits any K."""
    if mode not in ("int8", "int4") or (mode == "int8" and group_size is None):
        return group_size
    n = tp.world_size

    def row_parallel_inputs(c: ModelConfig) -> dict[str, int]:
        return {"o_proj (dense)": c.num_heads * c.head_dim, "down_proj (dense_4h_to_h)": c.intermediate_size}

    whole = row_parallel_inputs(config)
    shards = [row_parallel_inputs(TensorParallel(rank, n).shard_config(config)) for rank in range(n)]
    if group_size is None:
        ks = [config.hidden_size, *whole.values(), *(k for shard in shards for k in shard.values())]
        group_size = next((g for g in (64, 32) if all(k % g == 0 for k in ks)), 32)
    for rank, inputs in enumerate(shards):
        for name, k in inputs.items():
            if k % group_size:
                raise ValueError(f"{mode} quantization in groups of {group_size} does not fit {name} under "
                                 f"tensor_parallel_size={n}: rank {rank} holds {k} of its {whole[name]} inputs; "
                                 "choose a quant_group_size that divides it, or another tensor_parallel_size")
    return group_size


def read_rows(runs: list[tuple[int, int]]) -> Reader:
    """A reader of the rows `[start, stop)` of each run (the first dimension, biases too), concatenated."""
    def read(tensor_slice: Any) -> torch.Tensor:
        parts = [tensor_slice[start:stop] for start, stop in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    return read


def read_columns(start: int, stop: int) -> Reader:
    """A reader of the columns `[start, stop)` of a matrix (the input dimension of a row-parallel projection)."""
    return lambda tensor_slice: tensor_slice[:, start:stop]


def merge_runs(rows: list[int], width: int) -> list[tuple[int, int]]:
    """Row blocks of `width` starting at `rows`, in order, as maximal `[start, stop)` runs."""
    runs: list[tuple[int, int]] = []
    for start in rows:
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + width)
        else:
            runs.append((start, start + width))
    return runs


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place."""
    dist.all_reduce(x)
    return x


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's partial product `x_r W_r^T`, summed over ranks, then the bias once.

    `proj` is the rank's projection without bias (a models.layers.Linear, or the QuantizedLinear that replaces
    it); `weight` is its weight, so checkpoint targets name it as they would the plain projection's.
    """

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.bias = proj.bias
        proj.bias = None
        self.proj = proj

    @property
    def weight(self) -> torch.Tensor:
        return self.proj.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.proj(x))
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True)
class ShardReaders:
    """Readers of a rank's parts of the projections; all None without tensor parallelism (whole tensors)."""

    q_rows: Reader | None = None  # q_proj's rows (weight and bias)
    kv_rows: Reader | None = None  # k_proj's and v_proj's rows
    mlp_rows: Reader | None = None  # gate_proj's and up_proj's (dense_h_to_4h's) rows
    attn_columns: Reader | None = None  # o_proj's (dense's) input columns
    mlp_columns: Reader | None = None  # down_proj's (dense_4h_to_h's) input columns


def shard_readers(tp: TensorParallel | None, config: ModelConfig) -> ShardReaders:
    if tp is None:
        return ShardReaders()
    d = config.head_dim
    (h0, h1), (k0, k1), (i0, i1) = tp.heads(config), tp.kv_heads(config), tp.part(config.intermediate_size)
    return ShardReaders(read_rows([(h0 * d, h1 * d)]), read_rows([(k0 * d, k1 * d)]), read_rows([(i0, i1)]),
                        read_columns(h0 * d, h1 * d), read_columns(i0, i1))
