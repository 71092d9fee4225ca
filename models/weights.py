"""Where one checkpoint tensor lands in the model: a parameter, optionally a row range, optionally reordered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ParamTarget:
    param: torch.Tensor
    row_start: int = 0
    rows: int | None = None  # None: the whole parameter
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to the checkpoint tensor

    def view(self) -> torch.Tensor:
        """The part of the parameter the checkpoint tensor is copied into."""
        if self.rows is None:
            return self.param.data
        return self.param.data[self.row_start:self.row_start + self.rows]
