"""The k3 KL term far from the reference (|ref - logp| = 20 ... 80), and options that TRL ignores.

Held against an independent float64 transcription of TRL 1.16's formula, with no clamp at all
(``trl_kl_loss`` below; float64 keeps e^80 finite). With zero advantages every loss type's policy
term vanishes, so the loss is beta times the normalised KL and its gradient is the KL's alone.

What the fused loss promises there (``staged.kernels.grpo_loss``, "exp clamp"):
* token level with bias correction: the gradient is TRL's exactly, -(ref - logp) * ratio, for any
  ref - logp (the e^y terms cancel in closed form; nothing is clamped);
* otherwise, and for every value: exact while ref - logp <= KL_EXP_CLAMP (80; the old clamp at 20
  flipped the gradient's sign beyond it); beyond, finite, the sign of TRL's gradient, and magnitude
  at most about beta * e^80 * (|y| + 3) per token times the normaliser;
* the Triton and the torch paths agree everywhere.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from staged.kernels import grpo_loss
from staged.kernels.grpo_options import LOSS_TYPES
from staged.kernels.reference.grpo_loss import KL_EXP_CLAMP

BETA = 0.05


@pytest.fixture
def gen():
    seed = int(os.environ.get("STAGED_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def trl_kl_grad_exact(logp, old, ref, mask, loss_type, level, bias, max_len):
    """TRL's loss at zero advantages — beta * normaliser(k3 KL [* coef_1]), no clamp — and its
    d loss / d logp, at 60 significant digits (mpmath): float64 autograd
    cannot give it at ref - logp = 80, where the terms of (1 - e^y) r + (e^y - y - 1) r that cancel
    are 1e34 and float64 keeps 16 digits of them."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    B, T = logp.shape
    mpf = mpmath.mpf
    L = [[mpf(float(v)) for v in row] for row in logp]
    O = [[mpf(float(v)) for v in row] for row in old]
    R = [[mpf(float(v)) for v in row] for row in ref]
    M = [[mpf(float(v)) for v in row] for row in mask.double()]

    def row_terms(b, lrow):
        msum = sum(M[b])
        if bias and level == "sequence":
            lw = sum((lrow[t] - O[b][t]) * M[b][t] for t in range(T)) / max(msum, 1)
        out = []
        for t in range(T):
            d = R[b][t] - lrow[t]
            kl = mpmath.exp(d) - d - 1
            if bias:
                kl *= mpmath.exp(lw if level == "sequence" else lrow[t] - O[b][t])
            out.append(BETA * kl * M[b][t])
        return out, msum

    def loss_of_row(b, lrow):
        terms, msum = row_terms(b, lrow)
        tot_m = sum(sum(r) for r in M)
        s = sum(terms)
        if loss_type in ("grpo", "sapo"):
            return s / max(msum, 1) / B
        if loss_type == "dr_grpo":
            return s / (B * max_len)
        if loss_type == "luspo":
            return s / B
        return s / max(tot_m, 1)  # bnpo, dapo, cispo, vespo: the batch's token count

    g = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if M[b][t] == 0:
                continue

            def f(v, b=b, t=t):
                lrow = list(L[b])
                lrow[t] = v
                return loss_of_row(b, lrow)
            g[b, t] = float(mpmath.diff(f, L[b][t]))
    loss = float(sum(loss_of_row(b, L[b]) for b in range(B)))
    return g, loss


def _inputs(gen, B, T, big):
    """Rows: 0 one token far below the reference (ref - logp = +big), 1 every token so, 2 one token
    far above it (ref - logp = -big), 3 ordinary. Log-ratios logp - old stay small."""
    f64 = torch.float64
    logp = -torch.rand(B, T, generator=gen, dtype=f64) * 3 - 1
    old = logp - torch.randn(B, T, generator=gen, dtype=f64) * 0.1
    ref = logp + torch.randn(B, T, generator=gen, dtype=f64) * 0.3
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[:, :2] = True
    ref[0, 1] = logp[0, 1] + big[0]
    ref[1] = logp[1] + big[1] + torch.rand(T, generator=gen, dtype=f64) * 0.5
    ref[2, 0] = logp[2, 0] - big[2]
    return logp, old, ref, mask


@pytest.mark.parametrize("regime", ["exact", "past"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias_kl", "plain_kl"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_far_from_reference(loss_type, level, bias, regime, gen, device):
    """regime 'exact': ref - logp in [20, 79.5] (the old clamp at 20 flipped the sign there): loss
    and gradient are TRL's. 'past': 81 ... 150, beyond KL_EXP_CLAMP: finite, TRL's sign, bounded."""
    B, T = 4, 6
    lo, span = (20.0, 59.5) if regime == "exact" else (81.0, 69.0)
    big = (lo + torch.rand(3, generator=gen, dtype=torch.float64) * span).tolist()
    logp, old, ref, mask = _inputs(gen, B, T, big)
    if regime == "exact":
        ref[1] = ref[1].clamp(max=(logp[1] + 79.9))
    # fp32 inputs, and the exact reference on those same (rounded) values
    logp, old, ref = logp.float().double(), old.float().double(), ref.float().double()
    adv = torch.zeros(B, dtype=torch.float64)
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=BETA, use_bias_correction_kl=bias,
                max_completion_length=T)
    g_trl, loss_trl = trl_kl_grad_exact(logp, old, ref, mask, loss_type, level, bias, T)

    outs = {}
    for backend in ("triton", "torch"):
        lp = logp.to(torch.float32).to(device).requires_grad_(True)
        loss, metrics = grpo_loss(lp, old.float().to(device), ref.float().to(device), adv.float().to(device),
                                  mask.to(device), backend=backend, **opts)
        (g,) = torch.autograd.grad(loss, lp)
        outs[backend] = (loss.double().cpu(), g.double().cpu(), metrics["kl"].double().cpu())
    (loss, g, kl_metric), (loss_t, g_t, _) = outs["triton"], outs["torch"]

    assert torch.isfinite(loss) and torch.isfinite(g).all() and torch.isfinite(kl_metric)
    # the two paths implement one formula
    gs = g_t.abs().max().item()
    torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=0)
    torch.testing.assert_close(g, g_t, rtol=1e-4, atol=1e-6 * gs)
    assert (g[~mask] == 0).all()

    if regime == "exact" or (level == "token" and bias):
        # exact: TRL's value and gradient (fp32 evaluation of e^y: relative error ~ ulp(y) ~ 1e-5).
        # Token level with bias correction the gradient is the closed form -y r at any distance.
        # At sequence level a row's e^y terms cancel (all equal: exactly), so the residue carries
        # the fp32 rounding of y = ref - logp (ulp(80) / 2 = 4e-6) relative to the largest of them.
        # Their scale is the loss (their sum: all positive), not the largest gradient: a row whose
        # every token is far (row 1) can cancel down to gradients far below its terms (seen: an
        # error of 7e-7 x the loss was 1.7x over 3e-5 x the largest gradient; over 41 seeds the
        # error stays under 4e-6 x the loss).
        scale = g_trl.abs().max().item() if level == "token" else max(g_trl.abs().max().item(), abs(loss_trl))
        tol = 1e-6 if level == "token" else 3e-5
        torch.testing.assert_close(g, g_trl, rtol=2e-4, atol=tol * scale)
    if regime == "exact":
        torch.testing.assert_close(loss, torch.tensor(loss_trl, dtype=torch.float64), rtol=2e-4, atol=0)
    ok = g_trl.abs() > 1e-9 * g_trl.abs().max()
    bad = mask & ok & (torch.sign(g) != torch.sign(g_trl))
    assert not bad.any(), f"sign differs from TRL at {bad.nonzero().tolist()}: ours {g[bad]} TRL {g_trl[bad]}"
    bound = BETA * math.exp(KL_EXP_CLAMP) * (max(big) + 3) * 2.0  # ratio <= e^0.5, normaliser <= 1 per token
    assert g.abs().max().item() <= bound * (T if loss_type == "luspo" else 1)
    # row 3 is ordinary (|y| small) and rows do not interact: exact there
    torch.testing.assert_close(g[3], g_trl[3], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_past_the_clamp_is_increasing(level, device):
    """The KL value keeps growing past the clamp (exp continued by its tangent), so the loss a
    user logs is monotone in the distance to the reference."""
    ys = torch.tensor([[19.0, 21.0, 60.0, 79.0, 81.0, 120.0]], dtype=torch.float32)
    vals = []
    for j in range(ys.shape[1]):
        logp = torch.full((1, 1), -3.0, device=device)
        ref = logp + ys[:, j:j + 1].to(device)
        loss, m = grpo_loss(logp, logp, ref, torch.zeros(1, device=device), None, beta=1.0, loss_type="bnpo",
                            importance_sampling_level=level)
        vals.append(loss.item())
    assert all(math.isfinite(v) for v in vals) and all(a < b for a, b in zip(vals, vals[1:])), vals


# ---------------------------------------------------------------------------------------------
# options TRL ignores for a loss type are ignored here too (Liger passes them all positionally)

IGNORED = [
    ("cispo", dict(delta=2.0)), ("sapo", dict(delta=1.5)), ("vespo", dict(delta=3.0)),
    ("bnpo", dict(sapo_temperature_neg=0.0, sapo_temperature_pos=-1.0)),
    ("dapo", dict(vespo_k_pos=float("nan"), vespo_lambda_neg=float("inf"))),
    ("grpo", dict(delta=None, sapo_temperature_neg=False)),
    ("sapo", dict(eps_low=float("nan"), eps_high=-3.0)), ("vespo", dict(eps_low=-1.0)),
    ("grpo", dict(max_completion_length=0)),
]


@pytest.mark.parametrize("loss_type,extra", IGNORED, ids=[f"{t}-{'-'.join(e)}" for t, e in IGNORED])
def test_options_ignored_for_other_loss_types(loss_type, extra, gen, device):
    B, T = 3, 7
    logp = (-torch.rand(B, T, generator=gen) * 3).to(device)
    old = logp - torch.randn(B, T, generator=gen).to(device) * 0.3  # ratios both sides of any delta
    adv = torch.randn(B, generator=gen).to(device)
    base = dict(loss_type=loss_type, eps_high=5.0 if loss_type == "cispo" else 0.2)
    res = []
    for kw in (base, {**base, **extra}):
        lp = logp.clone().requires_grad_(True)
        loss, metrics = grpo_loss(lp, old, None, adv, None, **kw)
        res.append((loss, torch.autograd.grad(loss, lp)[0], metrics))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    assert {k: v.item() for k, v in res[0][2].items()} == {k: v.item() for k, v in res[1][2].items()}
