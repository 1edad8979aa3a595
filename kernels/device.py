"""Device facts the kernel launchers size their grids by, read once per device."""
from __future__ import annotations

import functools

import torch


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``: a device property, no sync."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())
