"""``make gpu-check``: everything a GPU can tell us, in one command, in under 9 minutes.

1. the CUDA tests (kernel tests compiled for the real card instead of interpreted),
2. every microbenchmark (appended to benchmarks/RESULTS.md with card, date and versions),
3. a short 1-GPU training run of the embedded default in bf16 (flash-attn when installed),
then one summary table. Each step has its own time limit; a step that cannot run (missing
package, older transformers) is reported as skipped with the reason and the rest carries on.
Without a CUDA GPU it says so and exits 0.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEPS = [
    # (name, command, time limit in s)
    ("cuda tests", [sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider",
                    "tests/kernels", "-m", "not slow"], 200),
    ("microbenchmarks", [sys.executable, "-m", "benchmarks", "--all", "--device", "cuda"], 200),
    ("train smoke (bf16, 1 GPU)", [sys.executable, "-m", "staged.train", "precision=bf16",
                                   "output_dir=outputs/gpu-check", "smoke=true"], 120),
]


def run_step(name: str, cmd: list[str], limit: int) -> tuple[str, float, str]:
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=limit, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        print(out if isinstance(out, str) else out.decode(errors="replace"))
        return "timeout", time.time() - t0, f"over {limit}s"
    print(proc.stdout)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), time.time() - t0, tail[:100]


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine; nothing to check (CPU checks: make test).")
        return 0
    print(f"gpu-check on {torch.cuda.get_device_name()} (torch {torch.__version__})")
    results = []
    for name, cmd, limit in STEPS:
        print(f"\n=== {name} ===", flush=True)
        results.append((name, *run_step(name, cmd, limit)))
    print("\n| step | status | seconds | last line |\n|---|---|---|---|")
    for name, status, secs, tail in results:
        print(f"| {name} | {status} | {secs:.0f} | {tail} |")
    return 0 if all(r[1] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
