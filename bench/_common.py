"""Shared benchmark helpers: the CPU's matrix features, matmul peak throughput, timing, memory and machine load.

Every bench prints the same machine header (``machine_report``) so numbers from different runs can be compared:
the CPU model, whether it has AMX tiles (bf16 matmuls several times faster than fp32) or only AVX-512 BF16, the
torch thread count and the load average. On a shared machine the load average says how much of the CPU the
bench actually had.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CpuFeatures",
    "RssSampler",
    "Stopwatch",
    "cpu_features",
    "load_average",
    "machine_report",
    "matmul_peak_gflops",
    "max_rss_bytes",
    "summarize",
]


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for matmuls: AMX tiles (``amx_bf16``), AVX-512 BF16 dot products, AVX-512."""

    model: str
    logical_cpus: int
    amx_bf16: bool
    amx_tile: bool
    avx512_bf16: bool
    avx512f: bool
    torch_capability: str

    @property
    def has_amx(self) -> bool:
        """AMX needs both the tile unit and its bf16 instructions (``amx_tile`` and ``amx_bf16`` flags)."""
        return self.amx_tile and self.amx_bf16

    def bf16_matmul_path(self) -> str:
        """The fastest bf16 matmul hardware path oneDNN can use here."""
        if self.has_amx:
            return "AMX tiles"
        if self.avx512_bf16:
            return "AVX-512 BF16 (no AMX)"
        return "no native bf16 (emulated through fp32)"


def _cpuinfo_flags_and_model(path: Path = Path("/proc/cpuinfo")) -> tuple[set[str], str]:
    try:
        text = path.read_text()
    except OSError:
        return set(), platform.processor() or "unknown"
    flags: set[str] = set()
    model = "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and model == "unknown":
            model = value.strip()
    return flags, model


def cpu_features() -> CpuFeatures:
    """The CPU flags that matter for fp32/bf16 matmuls, read from ``/proc/cpuinfo`` (Linux)."""
    flags, model = _cpuinfo_flags_and_model()
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    return CpuFeatures(
        model=model,
        logical_cpus=os.cpu_count() or 1,
        amx_bf16="amx_bf16" in flags,
        amx_tile="amx_tile" in flags,
        avx512_bf16="avx512_bf16" in flags,
        avx512f="avx512f" in flags,
        torch_capability=str(capability),
    )


def load_average() -> tuple[float, float, float]:
    """``os.getloadavg()`` (1, 5, 15 minutes); NaNs where the platform has none."""
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def machine_report() -> str:
    """One paragraph: CPU, matrix features, torch threads and the current load average."""
    f = cpu_features()
    load = load_average()
    return (
        f"cpu: {f.model} ({f.logical_cpus} logical CPUs); AMX: {'yes' if f.has_amx else 'no'}; "
        f"avx512_bf16: {'yes' if f.avx512_bf16 else 'no'}; bf16 matmul path: {f.bf16_matmul_path()}; "
        f"torch {torch.__version__} capability {f.torch_capability}, {torch.get_num_threads()} threads; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min)"
    )


def matmul_peak_gflops(
    dtype: torch.dtype = torch.float32, size: int = 1536, seconds: float = 0.6, repeats: int = 3
) -> float:
    """Best sustained GFLOP/s of ``size x size`` matmuls in ``dtype`` (``2 * size**3`` FLOPs each).

    ``repeats`` timed windows of about ``seconds / repeats`` each; the best window is returned, as a peak is the
    rate the machine can reach, not its average under someone else's load.
    """
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: oneDNN picks and caches its kernel
    flops = 2.0 * size**3
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    one = max(time.perf_counter() - start, 1e-6)
    per_window = max(1, int(seconds / repeats / one))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_window):
            torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        best = max(best, per_window * flops / elapsed / 1e9)
    return best


class Stopwatch:
    """Accumulates named wall-clock intervals: ``with sw("forward"): ...``; ``sw.totals`` in seconds."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str) -> _Interval:
        return _Interval(self, name)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1


class _Interval:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name, self.start = watch, name, 0.0

    def __enter__(self) -> _Interval:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.watch.add(self.name, time.perf_counter() - self.start)


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of ``/proc/self/status`` (the high-water mark of this program's own memory map).
    ``ru_maxrss`` is not used there: it survives ``exec``, so a child started from a large parent would report the
    parent's size. Elsewhere ``getrusage`` (macOS reports bytes, others KiB).
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if platform.system() == "Darwin" else 1024)


@dataclass
class RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a daemon thread (psutil); ``peak`` since ``reset``.

    Unlike ``tracemalloc`` (blind to torch's C++ allocations) this sees every tensor; unlike ``ru_maxrss`` it can be
    reset, so one phase's peak can be read on its own.
    """

    interval: float = 0.005
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _read: Callable[[], int] | None = None

    def __post_init__(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        process = psutil.Process()
        self._read = lambda: process.memory_info().rss

    @property
    def available(self) -> bool:
        return self._read is not None

    def current(self) -> int:
        return self._read() if self._read is not None else 0

    def reset(self) -> int:
        """Start a new peak from the current RSS (returned)."""
        self.peak = self.current()
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self.current()
            if rss > self.peak:
                self.peak = rss

    def __enter__(self) -> RssSampler:
        if self.available:
            self.reset()
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())


def summarize(values: list[float]) -> dict[str, float]:
    """Median, mean, min, max and sample standard deviation (0 for one value) of ``values``."""
    if not values:
        nan = float("nan")
        return {"median": nan, "mean": nan, "min": nan, "max": nan, "stdev": nan, "n": 0}
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }
