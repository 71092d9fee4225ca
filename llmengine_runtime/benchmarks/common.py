"""What both benchmarks share: statistics, memory and bandwidth probes, the machine, and the output files."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

OUT_DIR = Path("benchmarks/out")
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
MiB = 1 << 20


# -- statistics ---------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks, as numpy's default."""
    if not values:
        return float("nan")
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100
    lo = int(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def spread(values: list[float]) -> dict[str, float]:
    """Median and min/max of repeated measurements of one quantity."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": percentile(values, 50), "min": min(values), "max": max(values)}


def distribution(values: list[float]) -> dict[str, float]:
    """Mean and p50/p90/p99 of a latency sample (e.g. TTFT over all requests)."""
    mean = sum(values) / len(values) if values else float("nan")
    return {"mean": mean, "p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99)}


def parse_range(text: str) -> tuple[int, int]:
    """`"128"` -> (128, 128); `"64:256"` -> (64, 256), a uniform range, both ends included."""
    lo, _, hi = str(text).partition(":")
    lo_n, hi_n = int(lo), int(hi or lo)
    if lo_n < 1 or hi_n < lo_n:
        raise ValueError(f"bad length {text!r}: expected N or LO:HI with 1 <= LO <= HI")
    return lo_n, hi_n


# -- memory and bandwidth -----------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory over a region: `torch.cuda.max_memory_allocated` on CUDA (absolute); on CPU the peak
    resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set at `start`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "RSS peak delta"

    def start(self, base_rss: int | None = None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.base = base_rss if base_rss is not None else rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        except OSError:
            pass  # no reset: the peak is then the process's lifetime peak

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return max(0, _status_kib("VmHWM") * 1024 - self.base)


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024 if Path("/proc/self/status").exists() else 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted), best of `repeats`."""
    src = torch.ones(mib * MiB // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


# -- the machine --------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_has(flag: str) -> bool:
    try:
        return any(line.startswith("flags") and flag in line.split()
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if _cpu_has("amx_int8"):  # whether our int4/int8 products may use AMX tiles (kernels/cpu/amx_interleaved.cpp)
        info["amx_tiles"] = os.environ.get("LLMENGINE_AMX", "1") != "0"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def machine_line(info: dict[str, Any]) -> str:
    parts = [info["date"], f"CPU {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads)"]
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    if "amx_tiles" in info:
        parts.append("AMX tiles " + ("on" if info["amx_tiles"] else "off (LLMENGINE_AMX=0)"))
    parts.append(f"torch {info['torch']}")
    if info.get("transformers"):
        parts.append(f"transformers {info['transformers']}")
    if info.get("commit"):
        parts.append(f"commit {info['commit']}")
    return ", ".join(parts)


# -- output files -------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def finite(value: Any) -> Any:
    """The report with NaN and infinities as null, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_outputs(out_dir: Path, name: str, report: dict[str, Any], markdown: str) -> dict[str, Path]:
    """`name`.json and `name`.md in out_dir (created); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(finite(report), indent=2, default=str) + "\n")
    paths["md"].write_text(markdown)
    return paths


def append_results(title: str, markdown: str, info: dict[str, Any], path: Path = RESULTS_MD) -> Path:
    """Append a dated section (title, machine, table) to benchmarks/RESULTS.md."""
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by `llmengine bench ... --append-results`; "
                        "each section names the machine that produced it.\n")
    with path.open("a") as f:
        f.write(f"\n## {title}\n\n{machine_line(info)}\n\n{markdown}")
    return path


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"
