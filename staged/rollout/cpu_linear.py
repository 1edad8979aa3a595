"""The decode step's linear layers on a CPU: oneDNN with each weight reordered once per rollout.

Two reasons, both measured (1 thread, fp32, the benchmark's V = 151,936, H = 256 lm_head):

* speed: MKL's sgemm on a few dozen rows against the [V, H] weight repacks the whole weight at
  every call; oneDNN's linear on a weight reordered once runs the lm_head at 8 rows in 31 ms
  instead of 80, at 40 rows in 58 instead of 76 (and beats the [H, V] copy used before);
* batch invariance: MKL picks its kernel by row count (below 17 rows another kernel, another
  summation order), so a row's logits changed with the number of live rows beside it -- a 1e-6
  wobble that could flip a sampled token. oneDNN's reordered-weight kernel gives every row the
  same bits for 1..64 rows. With every linear of the decode step through it (the rest of the
  step -- norms, rotary, paged attention, the sampler -- is per row), a row's completion depends
  on its prompt and seed only, exactly.

The ops are torch's own (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what
inductor's CPU freezing pass emits). Where they are missing or refuse a weight, the module's own
forward runs: the same numbers up to rounding.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16)
_ROWS_HINT = 64  # the reorder's batch-size hint: any row count works with the result


def available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packed_forward(module: nn.Linear):
    """``module``'s forward from a reordered copy of its weight, remade whenever the weight
    tensor is replaced or written in place (FSDP2 swaps in the gathered weight at the first
    forward; the optimizer writes in place between rollouts)."""
    own = module.forward
    held: list = [None, -1, None]  # weight tensor, its version, the reordered copy

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = module.weight
        if (torch.is_grad_enabled() or x.dtype != w.dtype or w.dtype not in _DTYPES or x.device.type != "cpu"
                or type(w) not in (torch.Tensor, nn.Parameter)):  # a DTensor shard: not gathered
            return own(x)
        if held[0] is not w or held[1] != w._version:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ROWS_HINT)
            except RuntimeError:  # a build or CPU whose oneDNN refuses it: the module's own, from now on
                module.forward = own
                return own(x)
            held[:] = [w, w._version, packed]
        return torch.ops.mkldnn._linear_pointwise(x, held[2], module.bias, "none", [], "")
    return forward


@contextlib.contextmanager
def packed_linears(modules, device: torch.device):
    """Within the block, each plain ``nn.Linear`` in ``modules`` (searched recursively) runs its
    no-grad CPU forwards through oneDNN with a reordered weight; a no-op off the CPU."""
    if device.type != "cpu" or not available():
        yield
        return
    linears = {id(m): m for root in modules for m in root.modules() if type(m) is nn.Linear}
    for m in linears.values():
        m.forward = _packed_forward(m)
    try:
        yield
    finally:
        for m in linears.values():
            del m.forward
