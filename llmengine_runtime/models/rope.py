"""Rotary frequencies for the RoPE variants of HF checkpoints: default, linear, dynamic (NTK), llama3."""

from __future__ import annotations

import math

import torch

from llmengine_runtime.models.config import ModelConfig


def base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables `[positions, head_dim]` (cos half, then sin half) for the kernels' `rotary`.

    Dynamic NTK scaling stretches the base once a sequence outgrows `max_position_embeddings`; like HF
    generating one sequence, a token's angles use the length its sequence has when the token is processed.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu"):
        self.dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling or {}
        self.rope_type = config.rope_type
        self.max_positions = config.max_position_embeddings
        self.device = torch.device(device)
        inv_freq = base_inv_freq(self.dim, self.theta)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        elif self.rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        self.inv_freq = inv_freq
        self.cos_sin_cache = self._table(inv_freq, torch.arange(self.max_positions))

    def _table(self, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions.float()[:, None] * inv_freq[None, :]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(self.device)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        factor = self.scaling["factor"]
        base = self.theta * ((factor * seq_len / self.max_positions) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return base_inv_freq(self.dim, base)

    def reserve(self, num_positions: int) -> None:
        """Size the table for positions 0..num_positions-1 now (the engine's max model length), so that no step
        grows it and the one-call decode step (models/fused_decode.py) can pass it without a per-step check."""
        if self.rope_type != "dynamic" and num_positions > self.cos_sin_cache.shape[0]:
            self.cos_sin_cache = self._table(self.inv_freq, torch.arange(num_positions))

    def cos_sin(self, positions: torch.Tensor, seq_len_per_token: torch.Tensor | None = None):
        """(table, index): rows of `table[index]` are the angles of each token in `positions`."""
        if self.cos_sin_cache.device != positions.device:
            self.device = positions.device
            self.cos_sin_cache = self.cos_sin_cache.to(positions.device)
        if (not torch.compiler.is_compiling() and positions.numel() and self.rope_type != "dynamic"
                and int(positions.max()) >= self.cos_sin_cache.shape[0]):
            self.cos_sin_cache = self._table(self.inv_freq, torch.arange(2 * int(positions.max()) + 2))
        if self.rope_type != "dynamic" or seq_len_per_token is None:
            return self.cos_sin_cache, positions
        lens = seq_len_per_token.tolist()
        if max(lens, default=0) <= self.max_positions:
            return self.cos_sin_cache, positions
        pos_cpu = positions.cpu()
        rows = []
        for p, n in zip(pos_cpu.tolist(), lens):
            inv_freq = self.inv_freq if n <= self.max_positions else self._dynamic_inv_freq(n)
            rows.append(self._table(inv_freq, torch.tensor([p])))
        table = torch.cat(rows)
        return table, torch.arange(len(lens), device=positions.device)
