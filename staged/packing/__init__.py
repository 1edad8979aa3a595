"""Packing: GRPO samples -> data-parallel ranks -> micro-batches under a token budget.

``plan_micro_batches`` runs the C++ planner (``staged._C``) when it is built and the pure-Python
twin otherwise (or when ``STAGED_NO_EXT=1``); both give identical plans. See ``planner``.
"""
from staged.packing.planner import (
    DEFAULT_COST_A,
    DEFAULT_COST_B,
    DEFAULT_COST_VISION,
    HAS_EXT,
    PackPlan,
    backend_name,
    plan_micro_batches,
    plan_python,
    sample_cost,
)

__all__ = [
    "DEFAULT_COST_A",
    "DEFAULT_COST_B",
    "DEFAULT_COST_VISION",
    "HAS_EXT",
    "PackPlan",
    "backend_name",
    "plan_micro_batches",
    "plan_python",
    "sample_cost",
]
