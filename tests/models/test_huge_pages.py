"""Weights moved onto huge pages keep their values, their tying and their Parameter objects, and a loaded CPU model's
large weights live in a mapping advised MADV_HUGEPAGE."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmengine_runtime.models import huge_pages
from llmengine_runtime.models.huge_pages import huge_pages_available, move_to_huge_pages
from llmengine_runtime.models.loader import load_model
from tests.models.tiny import write_tiny_llama

needs_thp = pytest.mark.skipif(not huge_pages_available(), reason="transparent huge pages are off on this kernel")


def advised_huge(ptr: int) -> bool:
    """Whether the mapping holding address `ptr` carries the `hg` (MADV_HUGEPAGE) flag in /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()[1:]
    return False


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(300, 1000)
        self.embed.weight.data = torch.randn(300, 1000, generator=g)
        self.head = nn.Linear(1000, 300, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter in two modules
        self.register_buffer("raw", torch.randint(0, 256, (1500, 1000), dtype=torch.uint8, generator=g))
        self.register_buffer("codes", torch.randint(-9, 9, (700, 777), dtype=torch.int16, generator=g))
        self.small = nn.Parameter(torch.randn(10, generator=g))


@needs_thp
def test_values_tying_and_parameters_survive():
    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    param, small_ptr = model.embed.weight, model.small.data_ptr()
    moved = move_to_huge_pages(model, min_bytes=1 << 20)
    assert moved >= 300 * 1000 * 4 + 1500 * 1000 + 700 * 777 * 2
    assert model.embed.weight is param and model.head.weight is param
    assert model.small.data_ptr() == small_ptr  # under min_bytes: left where it was
    for name, value in model.state_dict().items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name
    for t in (model.embed.weight, model.raw, model.codes):
        assert advised_huge(t.data_ptr()) and t.data_ptr() % 64 == 0
    assert model.raw.data_ptr() % huge_pages.HUGE_PAGE == 0 or model.embed.weight.data_ptr() % huge_pages.HUGE_PAGE == 0
    out = model.head(model.embed(torch.tensor([3, 7])))
    assert torch.equal(out, before["embed.weight"][[3, 7]] @ before["embed.weight"].T)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("LLMENGINE_HUGE_PAGES", "0")
    model = Tied()
    ptr = model.raw.data_ptr()
    assert move_to_huge_pages(model) == 0 and model.raw.data_ptr() == ptr


@needs_thp
def test_loaded_model_weights_on_huge_pages(tmp_path, monkeypatch):
    folder = write_tiny_llama(tmp_path / "m", vocab_size=20000)  # a 1.3 MB embedding table, tied to the head
    model = load_model(folder, progress=False, pack=False, quantize="none")
    large = [t for t in list(model.parameters()) + list(model.buffers()) if t.numel() * t.element_size() >= 1 << 20]
    assert large and all(advised_huge(t.data_ptr()) for t in large)
    monkeypatch.setenv("LLMENGINE_HUGE_PAGES", "0")
    plain = load_model(folder, progress=False, pack=False, quantize="none")
    theirs = plain.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, theirs[name]), name
