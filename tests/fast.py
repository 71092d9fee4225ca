"""Which cases of a parametrized test `make test-fast` runs: the rest carry the slow mark (`make test` runs all)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest


def fast_subset(values: Iterable, fast: Iterable) -> list:
    """`values` for `pytest.mark.parametrize`, those not in `fast` marked slow (tuples are several arguments)."""
    fast = list(fast)
    return [v if v in fast else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
            for v in values]
