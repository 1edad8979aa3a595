"""Device facts the kernel launchers size their grids by (read once per device), and torch's
fp32 matmul precision setting, which fp32 kernels follow."""
from __future__ import annotations

import functools

import torch


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``: a device property, no sync."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def tf32_enabled() -> bool:
    """Whether torch's fp32 CUDA matmuls may use TF32: the newer ``fp32_precision`` setting where
    this torch has it (it reads the global one through; "none" when neither is set), as reading
    the legacy ``allow_tf32`` raises once the newer API has been used (torch 2.9+)."""
    prec = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if isinstance(prec, str):
        return prec == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)
