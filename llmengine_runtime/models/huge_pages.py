"""A CPU model's weights on 2 MiB pages (transparent huge pages), where decoding reads them from memory faster.

A decode step streams every weight once. On 4 KiB pages that is one TLB miss, and a page walk, every 4 KiB: on this
machine a GGUF Q8_0 product reads 16.5 GB/s from ordinary pages and 20.7 GB/s from huge ones (2 threads,
2048 x 8192, benchmarks/gguf_products.py). So after loading, `move_to_huge_pages` copies each large CPU parameter
and buffer of the model into one anonymous mapping advised MADV_HUGEPAGE and 2 MiB aligned, each tensor at a
64-byte boundary. The values are the same bytes; tensors that were one object (tied weights) stay one object.

It does nothing where the kernel has transparent huge pages off (`never`), on other systems, or with
LLMENGINE_HUGE_PAGES=0; when the kernel cannot find huge pages it falls back to ordinary ones by itself.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether the kernel may back an madvised mapping with huge pages (THP `always` or `madvise`)."""
    if os.environ.get("LLMENGINE_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of `nbytes` that starts on a 2 MiB boundary of a MADV_HUGEPAGE mapping (the
    tensor keeps the mapping alive)."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def _large_cpu_tensors(model: nn.Module, min_bytes: int) -> dict[int, tuple[torch.Tensor, list[tuple[dict, str]]]]:
    """Every large contiguous CPU parameter or buffer, once, with the (dict, key) places that hold it."""
    found: dict[int, tuple[torch.Tensor, list[tuple[dict, str]]]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if (t is not None and t.device.type == "cpu" and t.is_contiguous()
                        and t.numel() * t.element_size() >= min_bytes):
                    found.setdefault(id(t), (t, []))[1].append((table, name))
    return found


def move_to_huge_pages(model: nn.Module, min_bytes: int = 1 << 20) -> int:
    """Copy the model's CPU parameters and buffers of at least `min_bytes` into huge-page memory, in place (the
    same Parameter objects, their `.data` replaced), one tensor at a time so that each old copy can go before the
    next is made. Returns the bytes moved (0 where huge pages are off)."""
    if not huge_pages_available():
        return 0
    found = _large_cpu_tensors(model, min_bytes)
    total = sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t, _ in found.values())
    if not total:
        return 0
    arena, offset = huge_page_buffer(total), 0
    with torch.no_grad():
        for key in list(found):
            t, places = found.pop(key)
            nbytes = t.numel() * t.element_size()
            copy = arena[offset:offset + nbytes].view(t.dtype).view(t.shape)
            copy.copy_(t)
            offset += -(-nbytes // ALIGN) * ALIGN
            if isinstance(t, nn.Parameter):
                t.data = copy
            else:
                for table, name in places:
                    table[name] = copy
            del t, places
    return total
