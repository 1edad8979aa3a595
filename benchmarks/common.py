"""Shared benchmark plumbing: timing with quantiles, physical limits measured in the same run,
peak memory (CUDA allocator, process RSS), machine/version headers and Markdown tables.

Timing: on CUDA ``triton.testing.do_bench`` (it flushes L2 and syncs); on CPU a wall-clock loop
after warm-up. Both report the median and the 20th/80th percentiles in milliseconds.

Host memory: ``peak_rss_mb`` is the process high-water mark (``resource.getrusage`` ru_maxrss),
what a benchmark that runs each implementation in its own subprocess reports; ``reset_peak_rss`` +
``rss_mb`` measure the peak of one phase above the resident memory just before it (Linux);
``PeakExtraRSS`` does both around a block, after trimming the C heap.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def quantiles_ms(samples: list[float]) -> dict:
    """Median and 20th/80th percentiles of ``samples`` (ms) under the row keys every benchmark uses."""
    xs = list(samples)
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else xs * 9
    return {"median_ms": statistics.median(xs), "p20_ms": q[1], "p80_ms": q[7]}


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, rep: int = 10, graphed: bool = False) -> dict:
    """Median and 20/80 quantiles of ``fn``'s run time in ms. ``graphed`` (CUDA): ``fn`` replayed
    as a CUDA graph, for calls short enough that launching them would be what is timed; a ``fn``
    that cannot be captured falls back to plain launches (``timing`` says which)."""
    if device.startswith("cuda"):
        from triton.testing import do_bench, do_bench_cudagraph

        if graphed:
            try:
                med, p20, p80 = do_bench_cudagraph(fn, rep=100, quantiles=[0.5, 0.2, 0.8])
                return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "timing": "cuda graph"}
            except Exception as exc:  # noqa: BLE001 - not capturable: timed launched instead
                torch.cuda.synchronize()
                fallback = f"launched (graph capture failed: {type(exc).__name__})"
        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        out = {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
        if graphed:
            out["timing"] = fallback
        return out
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles_ms(samples)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak allocator memory above the starting point while running ``fn`` (CUDA only)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB): ``getrusage`` ru_maxrss (KiB on Linux,
    bytes on macOS). Run each implementation in its own process to get its own peak."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def _proc_status_mb(field: str) -> float | None:
    try:
        m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def rss_mb() -> float | None:
    """Current resident memory (MiB; Linux only, else None)."""
    return _proc_status_mb("VmRSS")


def hwm_mb() -> float | None:
    """Resident high-water mark since the last ``reset_peak_rss`` (MiB; Linux only, else None)."""
    return _proc_status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark to the current RSS (Linux >= 4.0: /proc/self/clear_refs).
    Returns False where that is not possible (then only ``peak_rss_mb`` is meaningful)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere), so
    that memory an earlier phase freed but malloc kept cannot hide the next phase's peak."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakExtraRSS:
    """``with PeakExtraRSS() as m: ...`` -> ``m.mb``: the peak resident memory of the block above
    the resident memory just before it, in MiB (the heap trimmed first: ``release_free_heap``);
    None where the high-water mark cannot be reset (not Linux)."""

    def __enter__(self):
        release_free_heap()
        self.ok = reset_peak_rss()
        self.base = rss_mb()
        self.mb = None
        return self

    def __exit__(self, *exc):
        hwm = hwm_mb()
        if self.ok and hwm is not None and self.base is not None:
            self.mb = hwm - self.base
        return False


def measured_limits(device: str) -> dict:
    """The physical limits measured in this run: a large bf16 GEMM (TFLOP/s) and a device copy
    (GB/s, read + write counted). Ratios against these are what benchmarks report as % of limit."""
    if device.startswith("cuda"):
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        gemm = time_ms(lambda: a @ b, device)["median_ms"]
        x = torch.empty(2**28, device=device, dtype=torch.uint8)
        y = torch.empty_like(x)
        copy = time_ms(lambda: y.copy_(x), device)["median_ms"]
        return {"gemm_tflops": 2 * n**3 / gemm / 1e9, "copy_gbps": 2 * x.numel() / copy / 1e6}
    # CPU (often shared): the 20th percentile, the rate the machine reaches when left alone
    x = torch.empty(2**26, dtype=torch.uint8).fill_(1)
    y = torch.empty_like(x).fill_(0)
    copy = time_ms(lambda: y.copy_(x), device, rep=15)["p20_ms"]
    a = torch.randn(1024, 1024)
    gemm = time_ms(lambda: a @ a, device, rep=15)["p20_ms"]
    return {"gemm_tflops": 2 * 1024**3 / gemm / 1e9, "copy_gbps": 2 * x.numel() / copy / 1e6}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header(device: str) -> str:
    import triton  # noqa: F401 - version only

    if device.startswith("cuda"):
        card = torch.cuda.get_device_name()
    else:
        card = f"CPU ({cpu_model()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"
    versions = f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}"
    if device.startswith("cuda") and torch.version.cuda:
        versions += f", CUDA {torch.version.cuda}"
    for dist in ("transformers", "liger-kernel", "trl", "flash-attn"):
        v = package_version(dist)
        versions += f", {dist} {v}" if v else f", no {dist}"
    return f"{card} — {_dt.date.today().isoformat()} — {versions}"


def package_version(dist: str) -> str | None:
    """Installed version of a distribution, without importing it (None when not installed)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out) + "\n"
