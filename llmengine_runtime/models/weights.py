"""Where one checkpoint tensor lands in the model: a parameter, optionally a row range, optionally reordered,
optionally only a part of the tensor (a tensor-parallel rank's slice, models/parallel.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class WeightsError(ValueError):
    """A checkpoint that does not match its config: names the tensor and what was expected."""


@dataclass
class ParamTarget:
    param: torch.Tensor
    row_start: int = 0
    rows: int | None = None  # None: the whole parameter
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to the checkpoint tensor
    # Reads the part of the checkpoint tensor this rank holds from its safetensors slice (`get_slice`), instead
    # of the whole tensor; None: the whole tensor.
    read: Callable[[Any], torch.Tensor] | None = None

    def view(self) -> torch.Tensor:
        """The part of the parameter the checkpoint tensor is copied into."""
        if self.rows is None:
            return self.param.data
        return self.param.data[self.row_start:self.row_start + self.rows]
