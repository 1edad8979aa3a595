"""Packing planner: C++ (staged._C) vs its pure-Python twin, 1k to 100k samples on 8 ranks.

The planner runs on the host once per step, before the packing kernels; it should cost well
under a millisecond per thousand samples. Times include the PackPlan wrap-up (rank loads,
computed in Python), which is the same for both backends; `raw_cpp` is the C++ call alone.
Both backends return the same plan, so imbalance and micro-batch counts are shown once.
"""
from __future__ import annotations

import random
import sys

from staged.packing import DEFAULT_COST_B, DEFAULT_COST_VISION, HAS_EXT, plan_micro_batches

RANKS = 8
GROUP_SIZE = 8  # completions per prompt
TOKEN_BUDGET = 16384


def make_step(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A GRPO step: prompts of 64-1024 tokens, completions of 16-2048 (2048: the paper's cap)."""
    rng = random.Random(seed)
    prompts = [rng.randint(64, 1024) for _ in range(n // GROUP_SIZE + 1)]
    lengths = [prompts[i // GROUP_SIZE] + rng.randint(16, 2048) for i in range(n)]
    return lengths, [i // GROUP_SIZE for i in range(n)]


def run(device: str = "cpu", limits: dict | None = None) -> list[dict]:
    """Rows for benchmarks/__main__.py: case, impl, median/p20/p80 ms, samples/s, quality."""
    from benchmarks.common import time_ms

    rows = []
    for n in (1_000, 10_000, 100_000):
        lengths, groups = make_step(n)
        case = f"n={n} ranks={RANKS}"
        impls = {"python": lambda: plan_micro_batches(lengths, groups, TOKEN_BUDGET, RANKS,
                                                      backend="python")}
        if HAS_EXT:
            from staged import _C

            impls["cpp"] = lambda: plan_micro_batches(lengths, groups, TOKEN_BUDGET, RANKS,
                                                      backend="cpp")
            impls["raw_cpp"] = lambda: _C.plan_micro_batches(
                lengths, groups, None, TOKEN_BUDGET, RANKS, 1.0, DEFAULT_COST_B,
                DEFAULT_COST_VISION)
        plan = impls["python"]()
        python_ms = None
        for impl, fn in impls.items():
            slow = impl == "python" and n >= 10_000
            t = time_ms(fn, "cpu", warmup=1 if slow else 3, rep=3 if slow else 10)
            python_ms = t["median_ms"] if impl == "python" else python_ms
            rows.append({"case": case, "impl": impl, **t,
                         "samples_per_s": n / t["median_ms"] * 1e3,
                         "speedup_vs_python": python_ms / t["median_ms"],
                         "imbalance": plan.imbalance if impl == "python" else None,
                         "micro_batches": plan.num_micro_batches if impl == "python" else None})
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    from benchmarks.common import markdown_table

    if not HAS_EXT:
        print("staged._C is not built: Python rows only")
    print(markdown_table(run()))
