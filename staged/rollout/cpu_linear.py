"""The decode step's linear layers on a CPU: oneDNN with each weight reordered once per rollout.

Two reasons, both measured (1 thread, fp32, the benchmark's V = 151,936, H = 256 lm_head):

* speed: MKL's sgemm on a few dozen rows against the [V, H] weight repacks the whole weight at
  every call; oneDNN's linear on a weight reordered once runs the lm_head at 8 rows in 31 ms
  instead of 80, at 40 rows in 58 instead of 76 (and beats the [H, V] copy used before);
* batch invariance: MKL picks its kernel by row count (below 17 rows another kernel, another
  summation order), so a row's logits changed with the number of live rows beside it -- a 1e-6
  wobble that could flip a sampled token. oneDNN's reordered-weight kernel gives every row the
  same bits for any row count in fp32 -- but for one: with a fan-in over 1,024 it runs a single
  row through another kernel (a gemv: other bits), so a lone row is computed as two copies of
  itself; in bf16 and fp16 the kernel also changes above 32 rows, so half rows go 32 at a time (a
  lone leftover doubled too). In bf16 the vision tower's patch embedding, a convolution whose kernel
  is its stride, runs as the linear it is: oneDNN's bf16 convolution picks its kernel by patch
  count (its fp32 one gives every patch the same bits: kept).
  With every linear of the decode step through it (the rest of the
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

_HALF = (torch.bfloat16, torch.float16)
_DTYPES = (torch.float32, *_HALF)
_ROWS_HINT = 64  # the reorder's batch-size hint: any row count works with the result
# bf16 kernels switch with the row count above 32 (measured: 33-36 and 37+ rows each another
# summation order at K = 1536), so bf16 rows go through in chunks of at most this many.
HALF_ROWS = 32


def available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _is_patch_conv(module: nn.Module) -> bool:
    """A convolution whose kernel is its stride and whose input is one patch per batch entry
    (the Qwen-VL towers' patch embedding): a linear over flattened patches."""
    return (isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.kernel_size == module.stride
            and module.groups == 1 and all(p == 0 for p in module.padding) and all(d == 1 for d in module.dilation))


def _packed_forward(module: nn.Module):
    """``module``'s forward (an ``nn.Linear``, or a patch convolution run as the linear it is)
    from a reordered copy of its weight, remade whenever the weight tensor is replaced or written
    in place (FSDP2 swaps in the gathered weight at the first forward; the optimizer writes in
    place between rollouts)."""
    own = module.forward
    held: list = [None, -1, None]  # weight tensor, its version, the reordered copy
    conv = not isinstance(module, nn.Linear)

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = module.weight
        if (torch.is_grad_enabled() or x.dtype != w.dtype or w.dtype not in _DTYPES or x.device.type != "cpu"
                or type(w) not in (torch.Tensor, nn.Parameter)  # a DTensor shard: not gathered
                or (conv and (x.dtype not in _HALF  # oneDNN's fp32 conv is row invariant: kept
                              or tuple(x.shape[2:]) != tuple(module.kernel_size)))):  # not one patch per entry
            return own(x)
        version = 0 if w.is_inference() else w._version  # inference tensors have no version counter
        if held[0] is not w or held[1] != version:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().reshape(w.shape[0], -1), _ROWS_HINT)
            except RuntimeError:  # a build or CPU whose oneDNN refuses it: the module's own, from now on
                module.forward = own
                return own(x)
            held[:] = [w, version, packed]
        if conv:  # [N, C, *kernel] patches -> [N, out, 1, ...]: oneDNN picks its conv kernels by N
            y = _rows_invariant(x.reshape(x.shape[0], -1), held[2], module.bias)
            return y.reshape(y.shape[0], y.shape[1], *([1] * len(module.kernel_size)))
        return _rows_invariant(x, held[2], module.bias)
    return forward


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.shape[0] == 1:  # one row: doubled, so that it takes the many-row kernel
        return torch.ops.mkldnn._linear_pointwise(torch.cat([x, x]), packed, bias, "none", [], "")[:1]
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _rows_invariant(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The linear on rows ``x`` [..., K], each row's result independent of the row count."""
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype in _HALF and rows.shape[0] > HALF_ROWS:
        y = torch.cat([_linear(c, packed, bias) for c in rows.split(HALF_ROWS)])
    else:
        y = _linear(rows, packed, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def packed_linears(modules, device: torch.device):
    """Within the block, each plain ``nn.Linear`` and patch convolution in ``modules`` (searched
    recursively) runs its no-grad CPU forwards through oneDNN with a reordered weight; a no-op off
    the CPU."""
    if device.type != "cpu" or not available():
        yield
        return
    # A module whose forward was set on the instance (accelerate's hooks, which may move its
    # weights in first; a user's wrapper) keeps it: the packed forward would skip it
    linears = {id(m): m for root in modules for m in root.modules()
               if (type(m) is nn.Linear or _is_patch_conv(m)) and "forward" not in m.__dict__}
    for m in linears.values():
        m.forward = _packed_forward(m)
    try:
        yield
    finally:
        for m in linears.values():
            del m.forward
