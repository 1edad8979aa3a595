"""Shared benchmark plumbing: timing with quantiles, physical limits measured in the same run,
machine/version headers and Markdown tables.

Timing: on CUDA ``triton.testing.do_bench`` (it flushes L2 and syncs); on CPU a wall-clock loop
after warm-up. Both report the median and the 20th/80th percentiles in milliseconds.
"""
from __future__ import annotations

import datetime as _dt
import platform
import statistics
import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, rep: int = 10) -> dict:
    """Median and 20/80 quantiles of ``fn``'s run time in ms."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"median_ms": statistics.median(samples), "p20_ms": q[1], "p80_ms": q[7]}


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
    x = torch.empty(2**26, dtype=torch.uint8)
    y = torch.empty_like(x)
    copy = time_ms(lambda: y.copy_(x), device, rep=5)["median_ms"]
    a = torch.randn(1024, 1024)
    gemm = time_ms(lambda: a @ a, device, rep=5)["median_ms"]
    return {"gemm_tflops": 2 * 1024**3 / gemm / 1e9, "copy_gbps": 2 * x.numel() / copy / 1e6}


def machine_header(device: str) -> str:
    import triton  # noqa: F401 - version only

    if device.startswith("cuda"):
        card = torch.cuda.get_device_name()
    else:
        card = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    versions = f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}"
    try:
        import transformers

        versions += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    return f"{card} — {_dt.date.today().isoformat()} — {versions}"


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
