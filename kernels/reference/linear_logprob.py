"""Plain-PyTorch references of ``fused_linear_logprob``: the naive [N, V] logits path.

    hidden [N, H], weight [V, H], bias [V] | None, targets [N] -> logp [N], entropy [N]

``linear_logprob_reference`` computes everything in ``compute_dtype`` (float64 by default): the
ground truth tests compare against, differentiable by autograd. ``linear_logprob_eager`` is what
an eager trainer does: the lm_head GEMM in the input dtype (logits rounded to bf16 for bf16
inputs), then log-softmax and entropy in fp32. It is the "PyTorch in the same precision" whose
error a low-precision kernel is judged against, and the eager baseline of the benchmark.
Memory: both materialise [N, V] logits plus log-softmax (and its gradient in backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _logprob_entropy(z: torch.Tensor, targets: torch.Tensor):
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def linear_logprob_reference(hidden, weight, targets, *, temperature=1.0, bias=None,
                             compute_dtype=torch.float64):
    """(logp, entropy) with the GEMM, temperature, softmax and entropy all in ``compute_dtype``."""
    logits = F.linear(hidden.to(compute_dtype), weight.to(compute_dtype),
                      bias.to(compute_dtype) if bias is not None else None)
    return _logprob_entropy(logits / temperature, targets)


def linear_logprob_eager(hidden, weight, targets, *, temperature=1.0, bias=None):
    """(logp, entropy) as an eager trainer computes them: logits = F.linear in the input dtype,
    then upcast to fp32 (``logits.float()``) for temperature, log-softmax and entropy."""
    logits = F.linear(hidden, weight, bias.to(hidden.dtype) if bias is not None else None)
    return _logprob_entropy(logits.float() / temperature, targets)


__all__ = ["linear_logprob_reference", "linear_logprob_eager"]
