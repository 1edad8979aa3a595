"""staged.kernels.grpo_loss against its float64 reference (values, metrics, autograd gradients).

Fresh random inputs every run; the seed is printed with every failure (reproduce with
STAGED_TEST_SEED=<seed>). Under TRITON_INTERPRET each case is small; the long-row case uses
B = 1 and a large block so it stays cheap. Parity with TRL and Liger: test_grpo_loss_parity.py.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from staged.kernels import grpo_loss
from staged.kernels.grpo_options import CLIPPED_LOSS_TYPES
from staged.kernels.reference.grpo_loss import EXP_CLAMP, grpo_loss_reference

# ---------------------------------------------------------------------------------------------
# inputs


@pytest.fixture
def gen():
    seed = int(os.environ.get("STAGED_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={seed}")  # pytest shows captured stdout of a failing test
    return torch.Generator().manual_seed(seed)


KINK_GAP = 1e-4  # keep log-ratios this far (in log space) from every clip/clamp threshold


def _kinks(opts: dict):
    """Log-space thresholds where the loss or its gradient jumps. fp32 (kernel) and fp64
    (reference) can fall on different sides of one, so test inputs keep clear of them."""
    ks = [EXP_CLAMP]
    eps_low = opts.get("eps_low", 0.2)
    eps_high = opts.get("eps_high", eps_low)
    if eps_low < 1:
        ks.append(math.log(1 - eps_low))
    ks.append(math.log(1 + eps_high))
    if opts.get("loss_type") == "cispo":
        ks.append(math.log(eps_high))
    if opts.get("delta") is not None:
        ks.append(math.log(opts["delta"]))
    if opts.get("dual_clip") is not None:
        ks.append(math.log(opts["dual_clip"]))
    return ks


def _is_kinks(opts: dict):
    ks = [EXP_CLAMP]
    for k in ("vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"):
        v = opts.get(k, 3.0 if k.endswith("max") else None)
        if v is not None and v > 0:
            ks.append(math.log(v))
    return ks


def _shift(x, kinks):
    """x + GAP*3 where x is within KINK_GAP of a kink (x: float64 tensor)."""
    near = torch.zeros_like(x, dtype=torch.bool)
    for k in kinks:
        near |= (x - k).abs() < KINK_GAP
    return torch.where(near, x + 3 * KINK_GAP, x), bool(near.any())


def make_inputs(gen, B, T, opts, *, packed=False, old=True, mask_kind="bool", masked_rows=(),
                spread=0.25, row_spread=0.3, vllm=None, dtype=torch.float32, row_shift=None):
    """Random GRPO inputs in the padded layout [B, T] (converted to packed when asked), kept
    clear of the thresholds of ``opts``. ``vllm``: None | "logp" | "ratio_token" | "ratio_row".
    ``row_shift`` [B]: added to each row's log-ratios (before they are moved off the kinks)."""
    f64 = torch.float64
    logp = -torch.rand(B, T, generator=gen, dtype=f64) * 3
    x = torch.randn(B, T, generator=gen, dtype=f64) * spread + torch.randn(B, 1, generator=gen, dtype=f64) * row_spread
    if row_shift is not None:
        x = x + torch.as_tensor(row_shift, dtype=f64).reshape(B, 1)
    ref = logp + torch.randn(B, T, generator=gen, dtype=f64) * 0.3
    adv = torch.randn(B, generator=gen, dtype=f64)
    if mask_kind == "bool":
        mask = torch.rand(B, T, generator=gen) > 0.25
    elif mask_kind == "float":  # token weights, TRL multiplies by them
        mask = torch.rand(B, T, generator=gen, dtype=f64).round(decimals=1) * (torch.rand(B, T, generator=gen) > 0.3)
    else:
        mask = None
    if masked_rows:
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool)
        for r in masked_rows:
            mask[r] = 0
    m = torch.ones(B, T, dtype=f64) if mask is None else mask.to(f64)
    kinks = _kinks(opts)
    if opts.get("importance_sampling_level") == "sequence":
        for _ in range(4):  # the row mean of x is the log-ratio: nudge whole rows
            lw = (x * m).sum(-1) / m.sum(-1).clamp(min=1)
            lw2, moved = _shift(lw, kinks)
            # adding delta to every valid x moves lw by delta * sum(m) / max(sum(m), 1)
            msum = m.sum(-1)
            delta = (lw2 - lw) * msum.clamp(min=1) / msum.clamp(min=1e-3)
            x = x + delta[:, None] * (m != 0)
            if not moved:
                break
    else:
        x, _ = _shift(x, kinks)
    old_logp = logp - x if old else None
    base = old_logp if old else logp
    sampling = ratio = None
    if vllm == "logp":
        d = torch.randn(B, T, generator=gen, dtype=f64) * 0.15
        d, _ = _shift(d, _is_kinks(opts))
        seqwise = opts.get("vllm_importance_sampling_mode", "sequence_mask").startswith("sequence")
        if seqwise:
            d = d * 0.3
            for _ in range(4):
                D = (d * m).sum(-1)
                D2, moved = _shift(D, _is_kinks(opts))
                first = (m != 0).float().argmax(-1)
                bump = torch.zeros_like(d)
                bump[torch.arange(B), first] = (D2 - D) / m[torch.arange(B), first].clamp(min=1e-3)
                d = d + bump * (m.sum(-1, keepdim=True) > 0)
                if not moved:
                    break
        sampling = base - d
    elif vllm == "ratio_token":
        ratio = torch.rand(B, T, generator=gen, dtype=f64) * 1.5 + 0.25
    elif vllm == "ratio_row":
        ratio = torch.rand(B, generator=gen, dtype=f64) * 1.5 + 0.25

    out = dict(logp=logp, old_logp=old_logp, ref_logp=ref, advantages=adv, mask=mask,
               sampling_logp=sampling, vllm_is_ratio=ratio)
    out = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "mask" else v)
           for k, v in out.items()}
    if isinstance(out["mask"], torch.Tensor) and out["mask"].is_floating_point():
        out["mask"] = out["mask"].float()
    if packed:
        out = to_packed(out, gen)
    return out


def to_packed(inp, gen):
    """Padded [B, T] -> packed [N] with cu_seqlens; rows get random lengths <= T (their tails
    dropped) and the buffer gets a few trailing tokens that belong to no sequence."""
    B, T = inp["logp"].shape
    lens = torch.randint(0, T + 1, (B,), generator=gen)
    lens[0] = T  # one full row
    keep = torch.arange(T)[None, :] < lens[:, None]
    tail = 3
    packed = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor) and tuple(v.shape) == (B, T):
            flat = v[keep]
            pad = torch.full((tail,), float("nan")) if v.is_floating_point() else torch.zeros(tail, dtype=v.dtype)
            packed[k] = torch.cat([flat, pad.to(v.dtype)])
        else:
            packed[k] = v
    packed["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    return packed


def _to(inp, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def run_both(inp, device, *, upstream=1.0, **opts):
    """(loss, metrics, grad) from the kernel and from the fp64 reference."""
    kin = _to(inp, device)
    lp = kin.pop("logp").detach().requires_grad_(True)
    loss, metrics = grpo_loss(lp, **kin, **opts)
    (g,) = torch.autograd.grad(loss * upstream, lp)
    rin = dict(inp)
    lr = rin.pop("logp").detach().to(torch.float64).requires_grad_(True)
    rloss, rmetrics = grpo_loss_reference(lr, **rin, **opts)
    (rg,) = torch.autograd.grad(rloss * upstream, lr)
    return (loss, metrics, g), (rloss, rmetrics, rg)


def assert_match(kernel, ref, *, rtol=2e-5, grad_rtol=1e-4):
    loss, metrics, g = kernel
    rloss, rmetrics, rg = ref
    assert torch.isfinite(loss).item(), f"loss not finite: {loss}"
    assert torch.isfinite(g).all().item(), "gradient not finite"
    scale = max(1.0, abs(rloss.item()))
    assert abs(loss.item() - rloss.item()) <= rtol * scale + 1e-6, f"loss {loss.item()} vs ref {rloss.item()}"
    assert set(metrics) == set(rmetrics), (sorted(metrics), sorted(rmetrics))
    for k in metrics:
        a, b = metrics[k].item(), rmetrics[k].item()
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"metric {k}: {a} vs ref {b}"
    gs = rg.abs().max().item()
    torch.testing.assert_close(g.double().cpu(), rg, rtol=grad_rtol, atol=1e-5 * gs + 1e-9,
                               msg=lambda m: f"gradient mismatch (max |ref grad| {gs:.3g}): {m}")


# ---------------------------------------------------------------------------------------------
# every valid option combination

LOSS_CONFIGS = (
    [dict(loss_type=t) for t in CLIPPED_LOSS_TYPES]
    # delta above and below 1 + eps_high (below it the cap also hides high clipping, which TRL
    # measures after the cap)
    + [dict(loss_type=t, delta=(1.5, 1.1)[i % 2]) for i, t in enumerate(CLIPPED_LOSS_TYPES)]
    + [dict(loss_type="cispo", eps_high=1.1), dict(loss_type="cispo", cispo_variant="verl", eps_low=0.2, eps_high=0.28),
       dict(loss_type="sapo"), dict(loss_type="vespo"),
       dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=0.5, vespo_k_neg=0.5, vespo_lambda_neg=0.0)]
)
KL_CONFIGS = [dict(beta=0.0), dict(beta=0.05, use_bias_correction_kl=True),
              dict(beta=0.05, use_bias_correction_kl=False)]
IS_CONFIGS = [
    None,
    dict(vllm="logp", vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=0.9,
         vllm_importance_sampling_clip_max=1.1),
    dict(vllm="logp", vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.9,
         vllm_importance_sampling_clip_max=1.1),
    dict(vllm="logp", vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_max=1.1),
    dict(vllm="logp", vllm_importance_sampling_mode="sequence_mask"),  # TRL defaults: [None, 3.0]
    dict(vllm="ratio_token"),
    dict(vllm="ratio_row"),
]


def _id(d):
    if d is None:
        return "no_is"
    return "-".join(f"{k}={v}" if not isinstance(v, str) else v for k, v in d.items()
                    if k not in ("vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"))


GRID = [(lc, lvl, kc, ic) for lc in LOSS_CONFIGS for lvl in ("token", "sequence")
        for kc in KL_CONFIGS for ic in IS_CONFIGS]


@pytest.mark.parametrize("case", range(len(GRID)),
                         ids=[f"{_id(lc)}-{lvl}-{_id(kc)}-{_id(ic)}" for lc, lvl, kc, ic in GRID])
def test_option_grid(case, gen, device):
    lc, level, kc, ic = GRID[case]
    opts = dict(lc, importance_sampling_level=level, **kc)
    if opts["loss_type"] == "dr_grpo":
        opts["max_completion_length"] = 32
    vllm = None
    if ic is not None:
        ic = dict(ic)
        vllm = ic.pop("vllm")
        opts.update(ic)
    if opts["loss_type"] == "vespo" and vllm == "logp" and opts["vllm_importance_sampling_mode"].startswith("seq"):
        inp = make_inputs(gen, 2, 5, opts, vllm=vllm)
        with pytest.raises(ValueError, match="vespo"):  # as TRL's GRPOTrainer raises
            grpo_loss(**inp, **opts)
        return
    # alternate the layout, on/off-policy and mask kind across the grid, so each axis of the grid
    # meets both layouts without multiplying the case count
    packed = case % 2 == 1
    old = case % 5 != 0
    mask_kind = ("bool", "float", "none")[case % 3]
    B, T = 3 + case % 3, 9 + case % 23
    inp = make_inputs(gen, B, T, opts, packed=packed, old=old, mask_kind=mask_kind, vllm=vllm,
                      masked_rows=(1,) if case % 4 == 0 else ())
    kernel, ref = run_both(inp, device, **opts)
    assert_match(kernel, ref)


# ---------------------------------------------------------------------------------------------
# shapes and layouts


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("B,T,block", [(1, 1, None), (1, 17, None), (4, 1, None), (2, 100, 16),
                                       (3, 1025, 256), (5, 33, 32), (1, 300, None)])
@pytest.mark.parametrize("opts", [dict(loss_type="grpo", beta=0.04),
                                  dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04,
                                       vllm_importance_sampling_mode="sequence_truncate")],
                         ids=["grpo-token-kl", "dapo-seq-kl-seqIS"])
def test_shapes(B, T, block, packed, opts, gen, device):
    inp = make_inputs(gen, B, T, opts, packed=packed, vllm="logp", masked_rows=(B - 1,) if B > 2 else ())
    kernel, ref = run_both(inp, device, block_size=block, **opts)
    assert_match(kernel, ref)


def test_all_rows_masked(gen, device):
    inp = make_inputs(gen, 3, 8, dict(loss_type="grpo"), mask_kind="bool", masked_rows=(0, 1, 2))
    for opts in (dict(loss_type="grpo", beta=0.1), dict(loss_type="bnpo", importance_sampling_level="sequence"),
                 dict(loss_type="dapo")):
        (loss, metrics, g), ref = run_both(inp, device, **opts)
        assert loss.item() == 0.0 and metrics["num_tokens"].item() == 0.0
        assert (g == 0).all()
        assert_match((loss, metrics, g), ref)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_long_row(packed, gen, device):
    """One row of 70k tokens: a (B, L) grid would need L programs; ours loops inside one."""
    T = 70_001
    opts = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                vllm_importance_sampling_mode="token_truncate")
    inp = make_inputs(gen, 1, T, opts, packed=False, vllm="logp")
    if packed:  # the long row plus a short one, sharing the buffer
        cu = torch.tensor([0, T - 50, T], dtype=torch.int64)
        inp = {k: (v.reshape(-1) if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in inp.items()}
        inp["advantages"] = torch.cat([inp["advantages"], -inp["advantages"]])
        inp["cu_seqlens"] = cu
    kernel, ref = run_both(inp, device, block_size=16384 if device == "cpu" else None, **opts)
    assert_match(kernel, ref, grad_rtol=2e-4)


def test_packed_equals_padded(gen, device):
    """The same sequences as padded rows and as a packed buffer give the same loss and grads."""
    opts = dict(loss_type="grpo", beta=0.02, importance_sampling_level="sequence")
    B, T = 4, 21
    inp = make_inputs(gen, B, T, opts, mask_kind="none", vllm=None)
    lens = torch.tensor([21, 5, 13, 0])
    mask = torch.arange(T)[None, :] < lens[:, None]
    inp["mask"] = mask
    (l1, m1, g1), _ = run_both(inp, device, **opts)
    keep = mask
    packed = {k: (v[keep] if isinstance(v, torch.Tensor) and tuple(v.shape) == (B, T) else v) for k, v in inp.items()}
    packed["mask"] = None
    packed["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    (l2, m2, g2), _ = run_both(packed, device, **opts)
    assert abs(l1.item() - l2.item()) < 1e-6
    for k in m1:
        assert abs(m1[k].item() - m2[k].item()) < 1e-6, k
    torch.testing.assert_close(g1[keep], g2, rtol=1e-5, atol=1e-9)
    assert (g1[~keep] == 0).all()


def test_packed_tokens_outside_sequences_get_zero_grad(gen, device):
    opts = dict(loss_type="dapo", beta=0.04)
    inp = make_inputs(gen, 3, 10, opts, packed=True)
    (loss, _, g), ref = run_both(inp, device, **opts)
    N = inp["logp"].numel()
    end = int(inp["cu_seqlens"][-1])
    assert end < N and (g[end:] == 0).all()
    assert_match((loss, _, g), ref)


def test_block_size_invariance(gen, device):
    opts = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05,
                vllm_importance_sampling_mode="sequence_mask")
    inp = make_inputs(gen, 3, 130, opts, vllm="logp")
    results = [run_both(inp, device, block_size=bs, **opts)[0] for bs in (16, 64, 256)]
    for loss, metrics, g in results[1:]:
        assert abs(loss.item() - results[0][0].item()) <= 1e-6 * max(1, abs(loss.item()))
        torch.testing.assert_close(g, results[0][2], rtol=1e-5, atol=1e-8)


def test_noncontiguous_inputs(gen, device):
    opts = dict(loss_type="bnpo", beta=0.04)
    inp = make_inputs(gen, 4, 12, opts)
    nc = {k: (v.t().contiguous().t() if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in inp.items()}
    assert not nc["logp"].is_contiguous()
    kernel, ref = run_both(nc, device, **opts)
    assert_match(kernel, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, gen, device):
    """Low-precision log-probs are upcast in the kernel: identical to the fp64 reference on the
    same (rounded) values; the gradient comes back in the input dtype."""
    opts = dict(loss_type="dapo", beta=0.04, importance_sampling_level="token")
    inp = make_inputs(gen, 3, 19, opts, dtype=dtype)
    kin = _to(inp, device)
    lp = kin.pop("logp").detach().requires_grad_(True)
    loss, metrics = grpo_loss(lp, **kin, **opts)
    loss.backward()
    assert lp.grad.dtype == dtype
    rin = dict(inp)
    lr = rin.pop("logp").detach().double().requires_grad_(True)
    rloss, _ = grpo_loss_reference(lr, **rin, **opts)
    rloss.backward()
    assert abs(loss.item() - rloss.item()) <= 2e-5 * max(1, abs(rloss.item()))
    torch.testing.assert_close(lp.grad.double().cpu(), lr.grad.to(dtype).double(), rtol=2e-2, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# numerics: extreme log-ratios, garbage in padding


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
def test_extreme_log_ratios_clamp(level, loss_type, gen, device):
    """Log-ratios of +-80 (and ref / vLLM log-ratios of +-80) clamp: finite loss, metrics and
    gradients, equal to the reference with the same clamp (TRL would give inf/NaN here)."""
    B, T = 4, 16
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.1, use_bias_correction_kl=True,
                vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None,
                vllm_importance_sampling_clip_min=0.5)
    if loss_type == "cispo":
        opts["eps_high"] = 5.0
    sign = torch.where(torch.rand(B, T, generator=gen) > 0.5, 80.0, -80.0)
    logp = -torch.rand(B, T, generator=gen) * 3
    inp = dict(logp=logp, old_logp=logp - sign, ref_logp=logp + sign.roll(1, 1), advantages=torch.randn(B, generator=gen),
               mask=torch.ones(B, T, dtype=torch.bool), sampling_logp=(logp - sign) - sign.roll(2, 1))
    if level == "sequence":  # rows whose mean log-ratio is +-80 exactly
        inp["old_logp"] = logp - torch.tensor([80.0, -80.0, 80.0, -80.0])[:, None]
    (loss, metrics, g), ref = run_both(inp, device, **opts)
    assert all(torch.isfinite(v).item() for v in metrics.values())
    assert_match((loss, metrics, g), ref)
    # the clamp is exactly exp(20) on the ratio
    assert metrics["ratio_mean"].item() <= math.exp(EXP_CLAMP) * (1 + 1e-6)


def test_garbage_in_masked_positions_is_ignored(gen, device):
    opts = dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence",
                vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.5)
    inp = make_inputs(gen, 3, 11, opts, vllm="logp")
    clean, _ = run_both(inp, device, **opts)
    dirty = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    bad = ~inp["mask"]
    for k, val in (("logp", float("nan")), ("old_logp", float("inf")), ("ref_logp", -float("inf")),
                   ("sampling_logp", float("nan"))):
        dirty[k][bad] = val
    got, _ = run_both(dirty, device, **opts)
    assert got[0].item() == pytest.approx(clean[0].item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(got[2], clean[2])


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
def test_nan_at_a_valid_position_propagates(level, loss_type, gen, device):
    """NaN never passes: a NaN log-prob the mask keeps makes the loss NaN, as in TRL (the
    kernel's clamps keep NaN; a plain tl.minimum on a GPU could swallow it)."""
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04)
    inp = make_inputs(gen, 2, 6, opts, mask_kind="none")
    for key in ("logp", "old_logp"):
        bad = dict(inp)
        bad[key] = inp[key].clone()
        bad[key][1, 2] = float("nan")
        kin = _to(bad, device)
        loss, _ = grpo_loss(kin.pop("logp"), **kin, **opts)
        assert torch.isnan(loss).item(), f"NaN in {key} did not reach the loss"


def test_empty_rows_and_tokens(gen, device):
    """T = 0 (no tokens at all) and B sequences of length 0 in a packed buffer: zero loss and
    metrics, no NaN, no launch on a null pointer."""
    opts = dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence")
    z = torch.zeros(3, 0, device=device)
    lp = z.clone().requires_grad_(True)
    loss, metrics = grpo_loss(lp, z, z, torch.randn(3, device=device), None, **opts)
    loss.backward()
    assert loss.item() == 0.0 and metrics["num_tokens"].item() == 0.0 and lp.grad.shape == (3, 0)
    lp = torch.randn(5, device=device).requires_grad_(True)
    loss, metrics = grpo_loss(lp, lp.detach(), lp.detach(), torch.randn(2, device=device), None,
                              cu_seqlens=torch.tensor([0, 0, 0], device=device), **opts)
    loss.backward()
    assert loss.item() == 0.0 and (lp.grad == 0).all()


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_nan_sampling_logp_means_ratio_one(mode, gen, device):
    """TRL: a token vLLM could not score (NaN) contributes log-ratio 0 (token ratio 1), not NaN."""
    opts = dict(loss_type="dapo", vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5,
                vllm_importance_sampling_clip_max=2.0)
    inp = make_inputs(gen, 2, 9, opts, vllm="logp", mask_kind="none")
    inp["sampling_logp"][0, 3] = float("nan")
    kernel, ref = run_both(inp, device, **opts)
    assert_match(kernel, ref)
    assert torch.isfinite(kernel[2]).all()


# ---------------------------------------------------------------------------------------------
# semantics that are easy to get subtly wrong


def test_on_policy_old_none_equals_detached_logp(gen, device):
    """old_logp=None is TRL's on-policy shortcut: every ratio is exactly 1 (all min() ties) and
    the gradient still flows through the ratio's numerator."""
    for opts in (dict(loss_type="grpo", beta=0.04), dict(loss_type="dapo", importance_sampling_level="sequence"),
                 dict(loss_type="sapo"), dict(loss_type="cispo", eps_high=4.0)):
        inp = make_inputs(gen, 3, 14, opts, old=False)
        (l1, m1, g1), ref = run_both(inp, device, **opts)
        assert_match((l1, m1, g1), ref)
        inp2 = dict(inp, old_logp=inp["logp"].clone())
        (l2, m2, g2), _ = run_both(inp2, device, **opts)
        assert abs(l1.item() - l2.item()) < 1e-6
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)
        assert m1["ratio_mean"].item() == pytest.approx(1.0)


def test_beta_zero_never_reads_ref(gen, device):
    opts = dict(loss_type="dapo")
    inp = make_inputs(gen, 3, 10, opts)
    a, _ = run_both(dict(inp, ref_logp=None), device, **opts)
    b, _ = run_both(dict(inp, ref_logp=torch.full_like(inp["logp"], float("nan"))), device, **opts)
    assert a[0].item() == b[0].item() and "kl" not in a[1]
    torch.testing.assert_close(a[2], b[2])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
def test_gradient_accumulation_and_num_items(loss_type, gen, device):
    """TRL's train-mode scaling: GA divides grpo/bnpo/dr_grpo/sapo/luspo; dapo/cispo use
    num_items_in_batch / num_processes * GA / steps_per_generation (tensor or number)."""
    opts = dict(loss_type=loss_type, beta=0.03, gradient_accumulation_steps=4, num_processes=2,
                steps_per_generation=8, max_completion_length=16)
    if loss_type == "cispo":
        opts["eps_high"] = 3.0
    inp = make_inputs(gen, 3, 16, opts)
    for n in (None, 57, torch.tensor(57.0), torch.tensor(0)):
        kernel, ref = run_both(dict(inp, num_items_in_batch=n), device, **opts)
        assert_match(kernel, ref)


def test_upstream_gradient_scales(gen, device):
    opts = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05)
    inp = make_inputs(gen, 3, 12, opts)
    kernel, ref = run_both(inp, device, upstream=-3.5, **opts)
    assert_match(kernel, ref)


def test_metrics_are_detached_device_tensors(gen, device):
    inp = _to(make_inputs(gen, 2, 7, dict(loss_type="dapo")), device)
    lp = inp.pop("logp").detach().requires_grad_(True)
    loss, metrics = grpo_loss(lp, **inp, loss_type="dapo", beta=0.1)
    assert set(metrics) == {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl",
                            "ratio_mean", "num_tokens"}
    for v in metrics.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
        assert v.device == lp.device
    assert loss.requires_grad and loss.device == lp.device


def test_no_grad_forward(gen, device):
    inp = _to(make_inputs(gen, 2, 7, dict(loss_type="dapo")), device)
    with torch.no_grad():
        loss, _ = grpo_loss(inp.pop("logp"), **inp, beta=0.1)
    assert torch.isfinite(loss).item() and not loss.requires_grad


def test_aliases_match_canonical_names(gen, device):
    inp = _to(make_inputs(gen, 2, 9, dict(loss_type="dapo", eps_low=0.1, eps_high=0.3), vllm="ratio_token"), device)
    lp = inp["logp"]
    a, ma = grpo_loss(lp, inp["old_logp"], inp["ref_logp"], inp["advantages"], inp["mask"], eps_low=0.1,
                      eps_high=0.3, beta=0.1, vllm_is_ratio=inp["vllm_is_ratio"])
    b, mb = grpo_loss(lp, advantages=inp["advantages"], old_per_token_logps=inp["old_logp"],
                      ref_per_token_logps=inp["ref_logp"], completion_mask=inp["mask"], epsilon=0.1,
                      epsilon_high=0.3, beta=0.1, importance_sampling_ratio=inp["vllm_is_ratio"])
    c, _ = grpo_loss(lp, advantages=inp["advantages"], old_per_token_logps=inp["old_logp"],
                     ref_per_token_logps=inp["ref_logp"], attention_mask=inp["mask"], epsilon_low=0.1,
                     epsilon_high=0.3, beta=0.1, vllm_is_ratio=inp["vllm_is_ratio"])
    assert a.item() == b.item() == c.item()
    with pytest.raises(ValueError, match="eps_low"):
        grpo_loss(lp, advantages=inp["advantages"], eps_low=0.1, epsilon=0.2)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(lp, advantages=inp["advantages"], mask=inp["mask"], completion_mask=inp["mask"])
    with pytest.raises(TypeError, match="epsilonn"):
        grpo_loss(lp, advantages=inp["advantages"], epsilonn=0.2)


def test_defaults_are_trls(gen, device):
    """No options = TRL's GRPOConfig defaults: dapo, eps 0.2/0.2, beta 0, token level."""
    inp = make_inputs(gen, 3, 10, dict(loss_type="dapo"))
    kernel, _ = run_both(inp, device)
    _, ref = run_both(inp, device, loss_type="dapo", eps_low=0.2, eps_high=0.2, beta=0.0,
                      importance_sampling_level="token", use_bias_correction_kl=True)
    assert_match(kernel, ref)


# ---------------------------------------------------------------------------------------------
# invalid combinations


def _base(device):
    B, T = 2, 5
    return dict(logp=torch.randn(B, T, device=device), advantages=torch.randn(B, device=device))


INVALID = [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(importance_sampling_level="batch"), "importance_sampling_level"),
    (dict(loss_type="vespo", sampling_logp="same"), "vespo"),  # TRL: token-level vLLM modes only
    (dict(loss_type="vespo", vespo_k_pos=float("nan")), "vespo_k_pos"),
    (dict(loss_type="grpo", delta=0.0), "delta"),
    (dict(loss_type="grpo", dual_clip=1.0), "dual_clip"),
    (dict(loss_type="dapo", dual_clip=0.5), "dual_clip"),
    (dict(loss_type="dapo", dual_clip=float("inf")), "dual_clip"),
    (dict(loss_type="dapo", dual_clip=float("nan")), "dual_clip"),
    (dict(loss_type="dapo", dual_clip=True), "dual_clip"),
    (dict(loss_type="cispo", dual_clip=3.0), "dual_clip"),
    (dict(loss_type="sapo", dual_clip=3.0), "dual_clip"),
    (dict(loss_type="vespo", dual_clip=3.0), "dual_clip"),
    (dict(loss_type="grpo", delta=float("inf")), "delta"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length"),
    (dict(eps_low=-0.1), "eps_low"),
    (dict(eps_high=float("nan")), "eps_high"),
    (dict(loss_type="cispo", eps_high=0.0), "eps_high"),
    (dict(beta=-0.1, ref_logp="same"), "beta"),
    (dict(beta=0.04), "ref_logp"),
    (dict(loss_type="grpo", cispo_variant="verl"), "cispo_variant"),
    (dict(loss_type="cispo", cispo_variant="openrlhf"), "cispo_variant"),
    (dict(loss_type="sapo", sapo_temperature_pos=0.0), "sapo_temperature_pos"),
    (dict(loss_type="sapo", sapo_temperature_neg=-1.0), "sapo_temperature_neg"),
    (dict(vllm_importance_sampling_mode="token"), "vllm_importance_sampling_mode"),
    (dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None), "clip"),
    (dict(vllm_importance_sampling_clip_min=2.0, vllm_importance_sampling_clip_max=1.0), "clip_min"),
    (dict(vllm_importance_sampling_clip_max=-1.0), "clip_max"),
    (dict(sampling_logp="same", vllm_is_ratio="same"), "sampling_logp"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(num_processes=0), "num_processes"),
    (dict(steps_per_generation=0), "steps_per_generation"),
    (dict(block_size=48), "block_size"),
    (dict(block_size=8), "block_size"),
    (dict(num_items_in_batch=torch.ones(2)), "num_items_in_batch"),
    (dict(num_items_in_batch="7"), "num_items_in_batch"),
    (dict(advantages="rows3"), "advantages"),
    (dict(advantages="int"), "advantages"),
    (dict(mask="wrong_shape"), "mask"),
    (dict(old_logp="wrong_shape"), "old_logp"),
    (dict(vllm_is_ratio="wrong_shape"), "vllm_is_ratio"),
    (dict(logp="1d"), "logp"),
    (dict(cu_seqlens="float"), "cu_seqlens"),
    (dict(cu_seqlens="empty"), "cu_seqlens"),
    (dict(logp="int"), "logp"),
]


@pytest.mark.parametrize("kwargs,needle", INVALID, ids=[n + "-" + "-".join(map(str, k)) for k, n in INVALID])
def test_invalid_combinations_raise(kwargs, needle, device):
    args = _base(device)
    B, T = args["logp"].shape
    kwargs = dict(kwargs)
    for k, v in list(kwargs.items()):
        if v == "same":
            kwargs[k] = torch.randn(B, T, device=device)
        elif v == "wrong_shape":
            kwargs[k] = torch.randn(B, T + 1, device=device)
        elif v == "rows3":
            kwargs[k] = torch.randn(B + 1, device=device)
        elif v == "int" and k == "advantages":
            kwargs[k] = torch.ones(B, dtype=torch.int64, device=device)
        elif v == "int" and k == "logp":
            kwargs[k] = torch.ones(B, T, dtype=torch.int64, device=device)
        elif v == "1d":
            kwargs[k] = torch.randn(B * T, device=device)
        elif v == "float":
            kwargs[k] = torch.tensor([0.0, 5.0, 10.0], device=device)
        elif v == "empty":
            kwargs[k] = torch.zeros(1, dtype=torch.int32, device=device)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        grpo_loss(**args)


@pytest.mark.cuda
def test_no_host_sync_on_cuda(gen):
    """The forward and backward never synchronise with the host (device tensors only)."""
    opts = dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04,
                vllm_importance_sampling_mode="sequence_mask")
    inp = _to(make_inputs(gen, 8, 300, opts, packed=True, vllm="logp"), "cuda")
    n_items = torch.tensor(1000.0, device="cuda")
    lp = inp.pop("logp").requires_grad_(True)
    grpo_loss(lp, **inp, num_items_in_batch=n_items, **opts)[0].backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # a device tensor, a Python number, a pageable and a pinned CPU tensor (copied from pinned
        # memory non-blocking, never read on the host)
        for n in (n_items, 1000, torch.tensor(1000.0), torch.tensor(1000).pin_memory()):
            loss, metrics = grpo_loss(lp, **inp, num_items_in_batch=n, **opts)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


# ---------------------------------------------------------------------------------------------
# dual clip (dual_clip=C): Triton kernel, the plain-torch path and the float64 reference against
# each other, and against verl's formula written out independently. Inputs put negative
# advantages on rows with large ratios (log-ratios shifted up to ~log C + 0.7), so the dual clip is
# active on a good share of tokens; every case checks that it was.

C = 2.0


def _dual_inputs(gen, B, T, opts, **kw):
    """Rows alternate: even rows A < 0 with log-ratios around log C + 0.7 (ratio > C: the dual
    clip fires), odd rows random. Keeps clear of every kink of ``opts`` (log C included)."""
    up = math.log(opts.get("dual_clip", C)) + 0.7
    shift = torch.tensor([up if b % 2 == 0 else 0.0 for b in range(B)], dtype=torch.float64)
    inp = make_inputs(gen, B, T, opts, spread=0.6, row_spread=0.3, row_shift=shift, **kw)
    adv = inp["advantages"].clone()
    adv[0::2] = -(adv[0::2].abs() + 0.1)
    inp["advantages"] = adv
    return inp


def _torch_path(inp, device, **opts):
    kin = _to(inp, device)
    lp = kin.pop("logp").detach().requires_grad_(True)
    loss, metrics = grpo_loss(lp, **kin, backend="torch", **opts)
    (g,) = torch.autograd.grad(loss, lp)
    return loss, metrics, g


# awkward shapes: T = 1, primes, just over a power of two; B = 1 and odd B
DUAL_SHAPES = [(1, 1), (2, 1), (3, 17), (5, 33), (4, 129), (7, 61), (1, 257), (6, 9)]
DUAL_GRID = [(lt, lvl, beta, delta, vllm, shape)
        for i, (lt, lvl, beta, delta, vllm) in enumerate(
            (lt, lvl, beta, delta, vllm)
            for lt in CLIPPED_LOSS_TYPES for lvl in ("token", "sequence") for beta in (0.0, 0.05)
            for delta, vllm in ((None, None), (4.0, "ratio_token"), (1.5, None)))
        for shape in [DUAL_SHAPES[i % len(DUAL_SHAPES)]]]


@pytest.mark.parametrize("case", range(len(DUAL_GRID)),
                         ids=[f"{lt}-{lvl}-beta{b}-delta{d}-{v}-{s[0]}x{s[1]}" for lt, lvl, b, d, v, s in DUAL_GRID])
def test_dual_clip_kernel_torch_reference(case, gen, device):
    lt, level, beta, delta, vllm, (B, T) = DUAL_GRID[case]
    opts = dict(loss_type=lt, importance_sampling_level=level, beta=beta, dual_clip=C)
    if delta is not None:
        opts["delta"] = delta
    if lt == "dr_grpo":
        opts["max_completion_length"] = 64
    # Fresh inputs until the dual clip fires (at most 4 draws, each checked): with packed rows of
    # random lengths and token weights, one draw's shifted rows can all come out short or weightless.
    duals = []
    for _ in range(4):
        inp = _dual_inputs(gen, B, T, opts, packed=case % 2 == 1, mask_kind=("bool", "float", "none")[case % 3],
                           vllm=vllm)
        kernel, ref = run_both(inp, device, **opts)
        assert_match(kernel, ref)
        assert_match(_torch_path(inp, device, **opts), ref)
        duals.append(ref[1]["clip_ratio/dual_mean"].item())
        if duals[-1] > 0.0 or (delta is not None and delta <= C) or B * T < 16:
            break
    if delta is not None and delta <= C:
        assert duals == [0.0]  # the delta cap keeps the ratio below C: the dual clip never fires
    elif B * T >= 16:  # (tiny cases may mask out the few tokens that would fire)
        assert max(duals) > 0.0, "the dual clip was never active: the test checks nothing"


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_dual_clip_long_rows_and_block_sizes(level, gen, device):
    opts = dict(loss_type="grpo", importance_sampling_level=level, beta=0.04, dual_clip=3.0)
    inp = _dual_inputs(gen, 3, 500, opts)
    for block in (32, None):  # 16 programs per row, and one
        kernel, ref = run_both(inp, device, block_size=block, **opts)
        assert_match(kernel, ref)
    assert ref[1]["clip_ratio/dual_mean"].item() > 0


def test_dual_clip_without_negative_advantages_changes_nothing(gen, device):
    opts = dict(loss_type="dapo", beta=0.04)
    inp = _dual_inputs(gen, 4, 40, opts)
    inp["advantages"] = inp["advantages"].abs() + 0.1
    (l0, m0, g0), _ = run_both(inp, device, **opts)
    (l1, m1, g1), ref = run_both(inp, device, dual_clip=C, **opts)
    assert l0.item() == l1.item()
    assert torch.equal(g0, g1)
    assert m1["clip_ratio/dual_mean"].item() == 0.0 and "clip_ratio/dual_mean" not in m0


# ---------------------------------------------------------------------------------------------
# verl's formula, written out here (facts from verl's compute_policy_loss, trainer/ppo/core_algos:
# pg1 = -A r, pg2 = -A clip(r, 1 - eps_low, 1 + eps_high), l1 = max(pg1, pg2), pg3 = -A C,
# l = where(A < 0, min(pg3, l1), l1); pg_clipfrac_lower = masked mean of (l1 > pg3) & (A < 0);
# r = exp(clamp(logp - old, -20, 20)))


def _verl_dual_clip(logp, old, adv, mask, eps_low, eps_high, c, agg):
    m = mask.to(torch.float64)
    a = adv[:, None]
    r = torch.exp((logp - old).clamp(-20.0, 20.0))
    pg1 = -a * r
    pg2 = -a * r.clamp(1 - eps_low, 1 + eps_high)
    l1 = torch.maximum(pg1, pg2)
    pg3 = -a * c
    loss_mat = torch.where(a < 0, torch.minimum(pg3, l1), l1)
    if agg == "token-mean":
        loss = (loss_mat * m).sum() / m.sum()
    else:  # "seq-mean-token-mean"
        loss = ((loss_mat * m).sum(-1) / m.sum(-1)).mean()
    lower = (((l1 > pg3) & (a < 0)).to(torch.float64) * m).sum() / m.sum()
    return loss, lower


@pytest.mark.parametrize("loss_type,agg", [("bnpo", "token-mean"), ("dapo", "token-mean"),
                                           ("grpo", "seq-mean-token-mean")])
@pytest.mark.parametrize("c", [1.5, 3.0])
def test_dual_clip_matches_verl(loss_type, agg, c, gen, device):
    B, T = 6, 37
    opts = dict(loss_type=loss_type, eps_low=0.2, eps_high=0.28, dual_clip=c)
    inp = _dual_inputs(gen, B, T, opts, mask_kind="bool")
    inp["mask"][:, 0] = True  # verl's seq-mean-token-mean divides by each row's count: no empty rows
    kin = _to(inp, device)
    lp = kin.pop("logp").detach().requires_grad_(True)
    loss, metrics = grpo_loss(lp, **kin, **opts)
    (g,) = torch.autograd.grad(loss, lp)

    vlp = inp["logp"].detach().double().requires_grad_(True)
    vloss, vlower = _verl_dual_clip(vlp, inp["old_logp"].double(), inp["advantages"].double(), inp["mask"],
                                    0.2, 0.28, c, agg)
    (vg,) = torch.autograd.grad(vloss, vlp)
    assert vlower.item() > 0, "the dual clip was never active"
    assert abs(loss.item() - vloss.item()) <= 2e-5 * max(1.0, abs(vloss.item()))
    assert abs(metrics["clip_ratio/dual_mean"].item() - vlower.item()) <= 1e-6
    torch.testing.assert_close(g.double().cpu(), vg, rtol=1e-4, atol=1e-7)
    # and the reference agrees (its autograd, not its closed forms)
    rl = inp["logp"].detach().double().requires_grad_(True)
    rloss, rmetrics = grpo_loss_reference(rl, **{k: v for k, v in inp.items() if k != "logp"}, **opts)
    assert abs(rloss.item() - vloss.item()) <= 1e-12 * max(1.0, abs(vloss.item()))
    assert rmetrics["clip_ratio/dual_mean"].item() == pytest.approx(vlower.item(), abs=1e-12)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo"])
def test_dual_clip_with_a_loss_type_that_has_no_clipped_surrogate_raises(loss_type, device):
    lp = torch.randn(2, 5, device=device)
    adv = torch.randn(2, device=device)
    for backend in ("auto", "torch"):
        with pytest.raises(ValueError, match=f"dual_clip=3.0 with loss_type='{loss_type}'"):
            grpo_loss(lp, advantages=adv, loss_type=loss_type, dual_clip=3.0, backend=backend)


def test_dual_clip_bound_is_named(device):
    lp = torch.randn(2, 5, device=device)
    with pytest.raises(ValueError, match=r"dual_clip=1\.0 must be None or a finite number > 1"):
        grpo_loss(lp, advantages=torch.randn(2, device=device), dual_clip=1.0)
    assert math.isfinite(C)


# ---------------------------------------------------------------------------------------------
# sequences split across programs (grid B * S): each program takes every S-th tile of its row,
# the row sums of pass 1 and the row statistics are partials reduced in a fixed order


SPLIT_CONFIGS = [
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.04),  # online-max KL merge
    dict(loss_type="dapo", importance_sampling_level="sequence", vllm_importance_sampling_mode="sequence_truncate"),
    dict(loss_type="dr_grpo", max_completion_length=300, dual_clip=2.0, beta=0.02),
    dict(loss_type="luspo", importance_sampling_level="sequence", dual_clip=2.0),
    dict(loss_type="cispo", eps_high=1.5, beta=0.03),
    dict(loss_type="cispo", cispo_variant="verl", importance_sampling_level="sequence"),
    dict(loss_type="sapo", importance_sampling_level="sequence", beta=0.03, use_bias_correction_kl=False),
    dict(loss_type="vespo", vllm_importance_sampling_mode="token_mask"),
    dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.02),
]
# (B, T, block): T not a multiple of the block, T < block, B = 1 with a long row, T = block + 1
SPLIT_SHAPES = [(3, 70, 16), (2, 10, 32), (1, 1000, 32), (4, 33, 32), (2, 257, 64)]
SPLIT_GRID = [(c, sh) for i, c in enumerate(SPLIT_CONFIGS) for sh in (SPLIT_SHAPES[i % 5], SPLIT_SHAPES[(i + 2) % 5])]


@pytest.mark.parametrize("case", range(len(SPLIT_GRID)),
                         ids=[f"{c['loss_type']}-{c.get('importance_sampling_level', 'token')}-{B}x{T}-block{bl}"
                              for c, (B, T, bl) in SPLIT_GRID])
def test_rows_split_across_programs(case, gen, device):
    opts, (B, T, block) = SPLIT_GRID[case]
    vllm = "logp" if "vllm_importance_sampling_mode" in opts else None
    inp = make_inputs(gen, B, T, opts, packed=case % 2 == 1, vllm=vllm,
                      mask_kind=("bool", "float", "none")[case % 3])
    kernel, ref = run_both(inp, device, block_size=block, **opts)
    assert_match(kernel, ref, grad_rtol=2e-4)


def test_split_layout_is_what_the_launcher_picks():
    """The grid really splits: S = ceil(mean row length / BLOCK) programs per sequence."""
    from staged.kernels.grpo_loss import _launch_config
    from staged.kernels.grpo_options import GRPOInputs

    def inp(B, T, N=None):
        return GRPOInputs(shape=(), packed=N is not None, B=B, T=0 if N else T, N=N or B * T, logp=None,
                          old_logp=None, ref_logp=None, sampling_logp=None, is_ratio_token=None,
                          is_ratio_row=None, mask=None, advantages=None, cu_seqlens=None)

    assert _launch_config(inp(3, 70), 16)[:2] == (16, 5)
    assert _launch_config(inp(2, 10), 32)[:2] == (32, 1)
    assert _launch_config(inp(1, 70_001), None)[:2] == (1024, 69)
    assert _launch_config(inp(4, 0, N=1000), 64)[:2] == (64, 4)  # packed: mean length 250


def test_split_is_deterministic(gen, device):
    """No atomics: the same call twice gives bit-identical loss, metrics and gradient."""
    opts = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, dual_clip=3.0)
    inp = make_inputs(gen, 3, 300, opts, packed=True)
    a = run_both(inp, device, block_size=16, **opts)[0]
    b = run_both(inp, device, block_size=16, **opts)[0]
    assert a[0].item() == b[0].item() and torch.equal(a[2], b[2])
    assert all(a[1][k].item() == b[1][k].item() for k in a[1])


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_num_items_kinds_agree(loss_type, gen, device):
    """num_items_in_batch as a Python number, a 0-d / [1] tensor, int or float: one result."""
    opts = dict(loss_type=loss_type, beta=0.03, num_processes=2, gradient_accumulation_steps=2)
    inp = make_inputs(gen, 3, 40, opts)
    ref_loss = None
    for n in (77, 77.0, torch.tensor(77), torch.tensor([77.0]), torch.tensor(77, dtype=torch.int32)):
        kernel, ref = run_both(dict(inp, num_items_in_batch=n), device, block_size=16, **opts)
        assert_match(kernel, ref)
        ref_loss = kernel[0].item() if ref_loss is None else ref_loss
        assert abs(kernel[0].item() - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss))


def test_bad_cu_seqlens_is_reported_not_read_out_of_bounds(device):
    """Packed bounds are clamped in the kernels; the finishing kernel's flag trips the
    device-side assert (on CPU it raises at once)."""
    lp = torch.randn(10, device=device, requires_grad=True)
    adv = torch.randn(2, device=device)
    for cu in ([0, 7, 5], [0, 4, 12], [-1, 3, 6]):
        with pytest.raises(RuntimeError, match="cu_seqlens"):
            grpo_loss(lp, advantages=adv, cu_seqlens=torch.tensor(cu, device=device))


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_no_host_read_on_the_path(backend, layout, gen, device, monkeypatch):
    """Forward and backward never read a tensor's value on the host (no .item() / .tolist() /
    .cpu() / bool() ...), for every kind of num_items_in_batch: checked on the host code with
    the Triton launches stubbed out (the interpreter itself reads its arguments on the host)."""
    import importlib

    gl = importlib.import_module("staged.kernels.grpo_loss")  # the module (the package exports the function)
    opts = dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04,
                vllm_importance_sampling_mode="sequence_mask")
    inp = _to(make_inputs(gen, 4, 50, opts, packed=layout == "packed", vllm="logp"), device)
    launches = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(self.name)

    if backend == "triton":
        for name in ("_grpo_loss_rows_kernel", "_grpo_loss_fwd_kernel", "_grpo_loss_finish_kernel",
                     "_grpo_loss_bwd_kernel"):
            monkeypatch.setattr(gl, name, Stub(name))
        monkeypatch.setattr(torch, "_assert_async", lambda *a, **k: launches.append("assert"))
    lp = inp.pop("logp").detach().requires_grad_(True)
    calls = []

    def trap(name):
        def f(self, *a, **k):
            calls.append(name)
            raise AssertionError(f"host read: Tensor.{name}")
        return f

    for n in (None, 1000, torch.tensor(1000.0, device=device), torch.tensor([1000], device=device)):
        with monkeypatch.context() as mp:
            for name in HOST_READS:
                mp.setattr(torch.Tensor, name, trap(name))
            loss, metrics = grpo_loss(lp, **inp, num_items_in_batch=n, backend=backend, **opts)
            loss.backward()
    assert not calls, calls
    if backend == "triton":
        want = ["_grpo_loss_rows_kernel", "_grpo_loss_fwd_kernel", "_grpo_loss_finish_kernel"]
        want += ["assert"] * (layout == "packed") + ["_grpo_loss_bwd_kernel"]
        assert launches == want * 4, launches
