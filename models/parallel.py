"""Tensor parallelism, Megatron style: which heads and rows each rank holds, how it reads them, and the all-reduce.

With N ranks, rank r holds
- query heads `[r H/N, (r+1) H/N)` and the KV heads they use: `n_kv/N` of them when N divides `n_kv`, else (N a
  multiple of `n_kv`: MQA, few KV groups) the one KV head of its query heads, replicated on `N/n_kv` ranks;
- rows `[r I/N, (r+1) I/N)` of the MLP's intermediate dimension.
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

from models.config import ModelConfig

Reader = Callable[[Any], torch.Tensor]  # a safetensors slice -> this rank's part of the tensor


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among `world_size` ranks (rank 0 runs the scheduler and computes logits)."""

    rank: int
    world_size: int

    def check(self, config: ModelConfig) -> None:
        """ValueError naming the size that `world_size` does not split."""
        n, h, h_kv = self.world_size, config.num_heads, config.num_kv_heads
        if h % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide the {h} attention heads")
        if h_kv % n and n % h_kv:
            raise ValueError(f"tensor_parallel_size={n} neither divides the {h_kv} KV heads nor is a multiple "
                             "of them (KV heads are split, or replicated when there are fewer than ranks)")
        if config.intermediate_size % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide the MLP size {config.intermediate_size}")

    def part(self, size: int) -> tuple[int, int]:
        """This rank's `[start, stop)` of a dimension split evenly."""
        step = size // self.world_size
        return self.rank * step, (self.rank + 1) * step

    def heads(self, config: ModelConfig) -> tuple[int, int]:
        return self.part(config.num_heads)

    def kv_heads(self, config: ModelConfig) -> tuple[int, int]:
        """The KV heads of this rank's query heads: a 1/N share, or one head replicated on N/n_kv ranks."""
        h_kv = config.num_kv_heads
        if h_kv >= self.world_size:
            return self.part(h_kv)
        kv = self.rank // (self.world_size // h_kv)
        return kv, kv + 1

    def shard_config(self, config: ModelConfig) -> ModelConfig:
        """The sizes of this rank's modules and KV cache: its heads and its part of the MLP."""
        self.check(config)
        kv_start, kv_stop = self.kv_heads(config)
        return replace(config, num_heads=config.num_heads // self.world_size, num_kv_heads=kv_stop - kv_start,
                       intermediate_size=config.intermediate_size // self.world_size)


def check_quantized_shards(config: ModelConfig, tp: TensorParallel, mode: str | None, group_size: int | None) -> None:
    """ValueError unless int8/int4 groups still divide the K/N inputs a row-parallel projection keeps per rank (the
    rank quantizes its slices, so each group then lies whole on one rank). int8 per output channel fits any K."""
    if mode not in ("int8", "int4") or (mode == "int8" and group_size is None):
        return
    shard, n = tp.shard_config(config), tp.world_size
    inputs = {"o_proj (dense)": shard.num_heads * shard.head_dim, "down_proj (dense_4h_to_h)": shard.intermediate_size}
    for name, k in inputs.items():
        if k % (group_size or 32):
            raise ValueError(f"{mode} quantization in groups of {group_size or 32} does not fit {name} under "
                             f"tensor_parallel_size={n}: each rank holds {k} of its {k * n} inputs; choose a "
                             "quant_group_size that divides it, or another tensor_parallel_size")


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
