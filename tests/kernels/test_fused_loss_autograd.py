"""Autograd edges of the fused loss: double backward is a clear error, and a module using the loss
compiles with ``torch.compile(fullgraph=True)`` on a CPU (no host read-back breaks the graph)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from staged.kernels import FusedLinearGRPOLoss, fused_linear_grpo_loss, grpo_loss


def _case(B=2, T=5, H=8, V=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    adv = torch.randn(B, generator=g)
    return h, w, ids, mask, adv


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_a_clear_error(backend):
    h, w, ids, mask, adv = _case()
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss, _ = fused_linear_grpo_loss(h, w, ids, mask, adv, beta=0.04, ref_logp=torch.zeros(2, 5) - 2.0,
                                     old_logp=torch.zeros(2, 5) - 2.5, backend=backend)
    # raised where the graph of the gradient would be built, or at its use at the latest
    with pytest.raises(RuntimeError, match="double backward|differentiate twice"):
        (gh,) = torch.autograd.grad(loss, h, create_graph=True)
        gh.sum().backward()


def test_double_backward_grpo_loss_triton():
    lp = (-torch.rand(3, 6)).requires_grad_(True)
    loss, _ = grpo_loss(lp, lp.detach() - 0.1, None, torch.randn(3), None, backend="triton")
    with pytest.raises(RuntimeError, match="differentiate twice|double backward"):
        (g,) = torch.autograd.grad(loss, lp, create_graph=True)
        torch.autograd.grad(g.sum(), lp)


class TinyPolicy(nn.Module):
    def __init__(self, H, V):
        super().__init__()
        self.body = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V, bias=False)
        self.loss = FusedLinearGRPOLoss(loss_type="dapo", beta=0.04, backend="torch")

    def forward(self, x, ids, mask, adv, ref, old):
        hidden = torch.tanh(self.body(x))
        return self.loss(hidden, self.lm_head.weight, ids, mask, adv, ref_per_token_logps=ref,
                         old_per_token_logps=old)


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    h, w, ids, mask, adv = _case(seed=1)
    torch.manual_seed(0)
    model = TinyPolicy(h.shape[-1], w.shape[0])
    ref = torch.full(ids.shape, -2.0)
    old = torch.full(ids.shape, -2.2)
    eager_loss, eager_m = model(h, ids, mask, adv, ref, old)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # graph breaks raise here
    loss, m = compiled(h, ids, mask, adv, ref, old)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["kl"], eager_m["kl"], rtol=1e-5, atol=1e-7)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
