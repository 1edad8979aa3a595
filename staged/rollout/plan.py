"""What the rollout engine and its sampler choose by the kind of device, decided in one place.

A CPU and a GPU make a row's completion independent of the rows beside it by different means. A
CPU runs kernels whose rounding never follows the batch: prompts prefilled packed, linears
through reordered weights, eager attention once per row length, the sampler's radix nucleus
over vocabulary chunks. A GPU runs its kernels (cuBLAS, a sorted nucleus) at shapes no
neighbour sets: decode steps of exactly ``SamplingParams.invariant_rows`` rows at static shapes
(replayed as CUDA graphs), one prompt per prefill forward. And on a GPU a look at which rows
finished is a host sync, so the host looks only every ``check_every`` steps.

``plan_for(device)`` is where the engine and the sampler learn which. Tests run CUDA's plan on
a CPU by mapping "cpu" to it in ``PLANS`` (tests/rollout/test_cuda_plan_on_cpu.py): the CUDA
code path's bookkeeping, shapes and cadence, without a GPU. What only a GPU can do keeps
following the tensors' real device: graph capture, pinned copies, device events, free-memory
queries, the CUDA attention kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DevicePlan:
    cpu_kernels: bool
    """The CPU's batch-invariant kernels (above); a prompt that cannot go packed is prefilled
    alone, not padded to a neighbour's length."""
    fixed_shapes: bool
    """``invariant_rows`` and ``cuda_graphs`` apply: decode steps and first-token draws at fixed
    row counts and static shapes, one prompt per prefill forward (with invariant_rows > 0)."""
    host_syncs: bool
    """A look at the finished rows costs a host sync: taken every ``check_every`` decode steps
    (else every step, free)."""


CPU = DevicePlan(cpu_kernels=True, fixed_shapes=False, host_syncs=False)
CUDA = DevicePlan(cpu_kernels=False, fixed_shapes=True, host_syncs=True)
# Another accelerator: the portable path (padded prefill, dynamic shapes, a look every step).
OTHER = DevicePlan(cpu_kernels=False, fixed_shapes=False, host_syncs=False)
PLANS = {"cpu": CPU, "cuda": CUDA}


def plan_for(device: torch.device | str) -> DevicePlan:
    """The plan of ``device``'s kind (read from PLANS at each call: tests remap a kind)."""
    return PLANS.get(torch.device(device).type, OTHER)
