"""staged.kernels.FusedLinearGRPOLoss (and fused_linear_grpo_loss, grpo_loss's torch backend).

* against the float64 references composed by hand (linear_logprob_reference -> grpo_loss_reference):
  loss, metrics and gradients to hidden, weight and bias; padded and packed layouts;
* Liger parity: LigerFusedLinearGRPOLoss (compiled=False, plain torch on CPU) with the same
  constructor and forward arguments gives the same loss / metrics / grads in fp32;
* tied embeddings, frozen weight, LoRA lm_head error, FSDP2 DTensor lm_head (2 gloo processes
  against one process), bad inputs.

Fresh random inputs every run; the seed is printed with every failure (STAGED_TEST_SEED=<seed>).
Most cases use backend="torch" in float64; the interpreted-Triton cases are tiny.
"""
from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from staged.kernels import FusedLinearGRPOLoss, fused_linear_grpo_loss, grpo_loss
from staged.kernels.fused_linear_grpo import GRPOMetrics, resolve_lm_head
from staged.kernels.reference.grpo_loss import grpo_loss_reference
from staged.kernels.reference.linear_logprob import linear_logprob_reference

try:
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss
    _LIGER_ERR = None
except Exception as exc:  # noqa: BLE001 - any import failure means: skip with the reason
    LigerFusedLinearGRPOLoss, _LIGER_ERR = None, f"liger_kernel not importable: {type(exc).__name__}: {exc}"
needs_liger = pytest.mark.skipif(LigerFusedLinearGRPOLoss is None, reason=_LIGER_ERR or "")

F64 = torch.float64


@pytest.fixture
def gen():
    seed = int(os.environ.get("STAGED_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _away(x, opts, gap=1e-3):
    """Keep log-ratios clear of the clip thresholds, where fp32 and fp64 may disagree."""
    eps_low = opts.get("epsilon_low", opts.get("eps_low", 0.2))
    eps_high = opts.get("epsilon_high", opts.get("eps_high")) or eps_low
    for k in (math.log(1 - eps_low), math.log(1 + eps_high), math.log(eps_high)):
        x = torch.where((x - k).abs() < gap, x + 3 * gap, x)
    return x


def make_case(gen, B=3, T=7, H=12, V=29, *, dtype=F64, bias=True, opts=None, garbage=True):
    """Random padded batch: hidden [B, T, H], weight [V, H], ids [B, T] (-100 where masked),
    mask, advantages, old / ref log-probs near the policy's own."""
    opts = opts or {}
    h = torch.randn(B, T, H, generator=gen, dtype=F64)
    w = torch.randn(V, H, generator=gen, dtype=F64) * 0.5
    b = torch.randn(V, generator=gen, dtype=F64) * 0.1 if bias else None
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[0] = True
    with torch.no_grad():
        lp = linear_logprob_reference(h, w, ids, bias=b, temperature=opts.get("temperature", 1.0))[0]
    x = _away(torch.randn(B, T, generator=gen, dtype=F64) * 0.2, opts)
    old = lp - x
    ref = lp + torch.randn(B, T, generator=gen, dtype=F64) * 0.2
    adv = torch.randn(B, generator=gen, dtype=F64)
    if garbage:
        ids = ids.masked_fill(~mask, -100)
    c = dict(hidden=h, weight=w, bias=b, ids=ids, mask=mask, adv=adv, old=old, ref=ref)
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("adv",) else v)
            for k, v in c.items()}


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def reference(c, *, temperature=1.0, ref_from_hidden=None, cu_seqlens=None, **opts):
    """Float64 composition: naive logits -> log_softmax -> TRL-style loss, autograd grads."""
    h, w = leaf(c["hidden"].to(F64)), leaf(c["weight"].to(F64))
    b = leaf(c["bias"].to(F64)) if c["bias"] is not None else None
    ids = c["ids"].clamp(min=0)
    logp, ent = linear_logprob_reference(h, w, ids, bias=b, temperature=temperature)
    ref = c["ref"]
    if ref_from_hidden is not None:
        rh, rw = ref_from_hidden
        with torch.no_grad():
            ref = linear_logprob_reference(rh.to(F64), rw.to(F64), ids, temperature=temperature)[0]
    loss, metrics = grpo_loss_reference(logp, c["old"], ref if opts.get("beta", 0.0) else None, c["adv"], c["mask"],
                                        cu_seqlens=cu_seqlens, **opts)
    loss.backward()
    m = c["mask"].to(F64)
    metrics["entropy"] = (ent.detach() * m).sum() / m.sum().clamp(min=1)
    return loss.detach(), metrics, h.grad, w.grad, (b.grad if b is not None else None)


def ours(c, *, backend="torch", temperature=1.0, cu_seqlens=None, **opts):
    h, w = leaf(c["hidden"]), leaf(c["weight"])
    b = leaf(c["bias"]) if c["bias"] is not None else None
    loss, metrics = fused_linear_grpo_loss(h, w, c["ids"], c["mask"], c["adv"], bias=b, old_logp=c["old"],
                                           ref_logp=c["ref"], cu_seqlens=cu_seqlens, temperature=temperature,
                                           return_entropy=True, backend=backend, **opts)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad, (b.grad if b is not None else None)


def assert_close_all(got, want, *, rtol=1e-9, atol=1e-11, metric_tol=1e-9):
    loss, metrics, gh, gw, gb = got
    rloss, rmetrics, rgh, rgw, rgb = want
    scale = max(1.0, abs(rloss.item()))
    assert abs(loss.item() - rloss.item()) <= rtol * scale + atol, f"loss {loss.item()} vs ref {rloss.item()}"
    for k, v in rmetrics.items():
        assert abs(metrics[k].item() - v.item()) <= metric_tol * max(1.0, abs(v.item())), \
            f"metric {k}: {metrics[k].item()} vs ref {v.item()}"
    for name, g, r in (("hidden", gh, rgh), ("weight", gw, rgw), ("bias", gb, rgb)):
        if r is None:
            assert g is None, name
            continue
        s = r.abs().max().item()
        torch.testing.assert_close(g.to(F64), r, rtol=rtol * 10, atol=atol + rtol * s,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


# ---------------------------------------------------------------------------------------------
# against the float64 references

CONFIGS = [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", beta=0.05),
    dict(loss_type="bnpo", beta=0.05, use_bias_correction_kl=False, importance_sampling_level="sequence"),
    dict(loss_type="dr_grpo", max_completion_length=16, delta=1.5),
    dict(loss_type="cispo", eps_high=1.1, beta=0.02),
    dict(loss_type="sapo", temperature=0.7),
    dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.03),
    dict(loss_type="dapo", eps_low=0.1, eps_high=0.28, num_items_in_batch=40, num_processes=2,
         gradient_accumulation_steps=2, steps_per_generation=4),
]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_float64_reference(cfg, packed, gen):
    opts = dict(cfg)
    temperature = opts.pop("temperature", 1.0)
    c = make_case(gen, opts=dict(cfg))
    want = reference(c, temperature=temperature, **opts)
    if packed:  # the same sequences, padded rows kept as masked tokens of a packed buffer
        B, T = c["ids"].shape
        pc = {k: (v.reshape(B * T, *v.shape[2:]) if isinstance(v, torch.Tensor) and v.dim() >= 2 else v)
              for k, v in c.items() if k not in ("weight", "bias")}
        pc.update(weight=c["weight"], bias=c["bias"])
        cu = torch.arange(0, B * T + 1, T)
        got = ours(pc, temperature=temperature, cu_seqlens=cu, **opts)
        got = (got[0], got[1], got[2].view(B, T, -1), got[3], got[4])
    else:
        got = ours(c, temperature=temperature, **opts)
    assert_close_all(got, want)
    assert set(got[1].keys()) == set(want[1].keys())


def test_ref_from_hidden_and_weight(gen):
    """beta != 0 with (ref_input, ref_weight): the reference log-probs are computed without grad
    from the reference model's hidden states and lm_head, at the same temperature."""
    c = make_case(gen, opts=dict(temperature=0.8))
    rh = c["hidden"] + 0.1 * torch.randn(c["hidden"].shape, generator=gen, dtype=F64)
    rw = leaf(c["weight"] * 0.9)
    want = reference(c, temperature=0.8, ref_from_hidden=(rh, rw), beta=0.1, loss_type="grpo")
    mod = FusedLinearGRPOLoss(beta=0.1, loss_type="grpo", temperature=0.8, return_entropy=True, backend="torch")
    h, w, b = leaf(c["hidden"]), leaf(c["weight"]), leaf(c["bias"])
    loss, metrics = mod(h, w, c["ids"], c["mask"], c["adv"], b, None, c["old"], rh, rw)
    loss.backward()
    assert_close_all((loss.detach(), metrics, h.grad, w.grad, b.grad), want)
    assert rw.grad is None  # no gradient into the reference model


def test_padded_equals_packed_variable_lengths(gen):
    """Rows of different lengths as padded [B, T] and as a packed buffer with cu_seqlens (plus
    trailing tokens outside every sequence, holding garbage) give identical loss and grads."""
    B, T, H, V = 4, 9, 10, 23
    c = make_case(gen, B, T, H, V, garbage=False)
    lens = torch.tensor([9, 3, 6, 0])
    c["mask"] = torch.arange(T)[None, :] < lens[:, None]
    opts = dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence")
    a = ours(c, **opts)
    keep = c["mask"]
    tail = 2
    pc = {}
    for k in ("hidden", "ids", "old", "ref"):
        flat = c[k][keep]
        pad = torch.full((tail, *flat.shape[1:]), float("nan") if flat.is_floating_point() else -7, dtype=flat.dtype)
        pc[k] = torch.cat([flat, pad])
    pc.update(weight=c["weight"], bias=c["bias"], adv=c["adv"], mask=None)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    b = ours(pc, cu_seqlens=cu, **opts)
    assert abs(a[0].item() - b[0].item()) < 1e-12
    for k in a[1].keys():
        assert abs(a[1][k].item() - b[1][k].item()) < 1e-12, k
    torch.testing.assert_close(a[2][keep], b[2][: keep.sum()], rtol=1e-10, atol=1e-12)
    assert (b[2][keep.sum():] == 0).all() and (a[2][~keep] == 0).all()
    torch.testing.assert_close(a[3], b[3], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a[4], b[4], rtol=1e-10, atol=1e-12)


def test_garbage_at_masked_positions_never_reaches_grads(gen):
    """NaN hidden rows and out-of-range ids where the mask is 0 (padding) change nothing."""
    c = make_case(gen, garbage=False)
    opts = dict(loss_type="dapo", beta=0.05)
    clean = ours(c, **opts)
    dirty = dict(c)
    dirty["hidden"] = c["hidden"].masked_fill(~c["mask"][..., None], float("nan"))
    dirty["ids"] = c["ids"].masked_fill(~c["mask"], 10_000)
    got = ours(dirty, **opts)
    assert torch.isfinite(got[3]).all() and torch.isfinite(got[2]).all()
    assert got[0].item() == pytest.approx(clean[0].item(), rel=1e-12)
    torch.testing.assert_close(got[3], clean[3])


@pytest.mark.parametrize("cfg", [dict(loss_type="grpo", beta=0.04), dict(loss_type="dapo", importance_sampling_level="sequence")],
                         ids=["grpo-kl", "dapo-seq"])
def test_triton_interpreted_fp32(cfg, gen, device):
    """The Triton kernels (interpreted on CPU), fp32, against the float64 composition."""
    c = make_case(gen, B=2, T=5, H=16, V=37, dtype=torch.float32, opts=cfg)
    c = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    got = ours(c, backend="triton", **cfg)
    want = reference({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}, **cfg)
    got = tuple(g.cpu() if isinstance(g, torch.Tensor) else g for g in got[:1]) + (got[1],) + \
        tuple(g.cpu() for g in got[2:])
    assert_close_all(got, want, rtol=2e-5, atol=1e-6, metric_tol=2e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cuda_bf16_no_host_sync(packed, gen):
    """On CUDA (Triton kernels, bf16 hidden / weight): forward and backward of the module never
    synchronise with the host, and the loss matches the float64 composition on the same values."""
    opts = dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence")
    B, T, H, V = 4, 33, 64, 1000
    c = make_case(gen, B, T, H, V, dtype=torch.bfloat16, opts=opts)
    c["adv"] = c["adv"].float()
    cu = None
    if packed:
        c = {k: (v.reshape(B * T, *v.shape[2:]) if isinstance(v, torch.Tensor) and v.dim() >= 2 and k != "weight" else v)
             for k, v in c.items()}
        cu = torch.arange(0, B * T + 1, T, device="cuda")
    want = reference({k: v for k, v in c.items()}, cu_seqlens=cu.cpu() if packed else None, **opts)
    cc = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    mod = FusedLinearGRPOLoss(beta=0.04, loss_type="grpo", importance_sampling_level="sequence", return_entropy=True)
    h, w, b = leaf(cc["hidden"]), leaf(cc["weight"]), leaf(cc["bias"])
    args = (h, w, cc["ids"], cc["mask"], cc["adv"], b, cc["ref"], cc["old"])
    mod(*args, cu_seqlens=cu)[0].backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = mod(*args, cu_seqlens=cu)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert abs(loss.item() - want[0].item()) <= 2e-3 * max(1.0, abs(want[0].item()))
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()


# ---------------------------------------------------------------------------------------------
# the module: Liger's signature, metrics


def test_metrics_tuple_in_liger_order_and_by_name(gen):
    c = make_case(gen)
    for beta, n in ((0.0, 1), (0.1, 2)):
        loss, metrics = FusedLinearGRPOLoss(beta=beta, return_entropy=True, backend="torch")(
            c["hidden"], c["weight"], c["ids"], c["mask"], c["adv"], c["bias"], c["ref"], c["old"])
        assert isinstance(metrics, tuple) and isinstance(metrics, GRPOMetrics) and len(metrics) == n
        assert metrics[-1] is metrics["clip_ratio/region_mean"]
        if beta:
            kl, clip = metrics  # Liger: (kl, clip_ratio)
            assert kl is metrics["kl"]
        assert "entropy" in metrics and "kl" in metrics.keys() if beta else "kl" not in metrics
        d = dict(metrics)
        assert set(d) >= {"clip_ratio/low_mean", "clip_ratio/high_mean", "ratio_mean", "num_tokens", "entropy"}
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in d.values())
        import copy
        assert dict(copy.deepcopy(metrics)).keys() == d.keys()


def test_defaults_follow_trl(gen):
    """No arguments: TRL's GRPOConfig defaults (dapo, eps 0.2/0.2, beta 0, bias-corrected KL)."""
    mod = FusedLinearGRPOLoss()
    o = mod.opts
    assert (o.loss_type, o.eps_low, o.eps_high, o.beta, o.use_bias_correction_kl, o.importance_sampling_level) == \
        ("dapo", 0.2, 0.2, 0.0, True, "token")
    assert mod.use_ref_model is False and FusedLinearGRPOLoss(beta=0.1).use_ref_model is True


def test_use_ref_model_false_means_no_kl(gen):
    """Liger: use_ref_model=False with beta != 0 compares the policy with itself (KL 0)."""
    c = make_case(gen)
    args = (c["hidden"], c["weight"], c["ids"], c["mask"], c["adv"], c["bias"])
    l0, _ = FusedLinearGRPOLoss(beta=0.0, backend="torch")(*args, old_per_token_logps=c["old"])
    l1, m1 = FusedLinearGRPOLoss(beta=0.3, use_ref_model=False, backend="torch")(*args, old_per_token_logps=c["old"])
    assert l1.item() == pytest.approx(l0.item(), rel=1e-12) and m1["kl"].item() == 0.0
    # a reference given anyway is ignored, as in Liger
    l2, m2 = FusedLinearGRPOLoss(beta=0.3, use_ref_model=False, backend="torch")(
        *args, ref_per_token_logps=c["ref"], old_per_token_logps=c["old"])
    assert l2.item() == l1.item() and m2["kl"].item() == 0.0
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        FusedLinearGRPOLoss(beta=0.3, backend="torch")(*args)


def test_lm_head_module_as_weight(gen):
    c = make_case(gen)
    head = nn.Linear(c["weight"].shape[1], c["weight"].shape[0], dtype=F64)
    with torch.no_grad():
        head.weight.copy_(c["weight"])
        head.bias.copy_(c["bias"])
    mod = FusedLinearGRPOLoss(backend="torch")
    l1, _ = mod(c["hidden"], head, c["ids"], c["mask"], c["adv"], old_per_token_logps=c["old"])
    l1.backward()
    l2, _ = mod(c["hidden"], c["weight"], c["ids"], c["mask"], c["adv"], c["bias"], old_per_token_logps=c["old"])
    assert l1.item() == l2.item() and head.weight.grad is not None and head.bias.grad is not None


# ---------------------------------------------------------------------------------------------
# weights: tied, frozen, LoRA


def test_tied_embeddings(gen):
    """lm_head.weight is embed_tokens.weight: the gradient is the sum of both uses, as with an
    ordinary logits path."""
    V, H, B, T = 31, 8, 3, 6
    torch.manual_seed(0)
    embed = nn.Embedding(V, H, dtype=F64)
    head = nn.Linear(H, V, bias=False, dtype=F64)
    head.weight = embed.weight
    assert head.weight is embed.weight
    ids = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    adv = torch.randn(B, generator=gen, dtype=F64)
    opts = dict(loss_type="grpo", beta=0.0)

    loss, _ = FusedLinearGRPOLoss(backend="torch", **opts)(torch.tanh(embed(ids)), head, targets, mask, adv)
    loss.backward()
    g = embed.weight.grad.clone()
    embed.weight.grad = None
    logp = torch.log_softmax(torch.tanh(embed(ids)) @ embed.weight.t(), -1).gather(-1, targets[..., None])[..., 0]
    rloss, _ = grpo_loss_reference(logp, None, None, adv, mask, **opts)
    rloss.backward()
    assert loss.item() == pytest.approx(rloss.item(), rel=1e-10)
    torch.testing.assert_close(g, embed.weight.grad, rtol=1e-9, atol=1e-12)


def test_frozen_weight_gets_no_grad(gen):
    c = make_case(gen)
    h = leaf(c["hidden"])
    w = c["weight"].clone().requires_grad_(False)
    b = c["bias"].clone().requires_grad_(False)
    loss, _ = FusedLinearGRPOLoss(backend="torch")(h, w, c["ids"], c["mask"], c["adv"], b, old_per_token_logps=c["old"])
    loss.backward()
    assert w.grad is None and b.grad is None and h.grad is not None and torch.isfinite(h.grad).all()
    head = nn.Linear(4, 7)
    head.requires_grad_(False)
    loss, _ = FusedLinearGRPOLoss(backend="torch")(torch.randn(2, 3, 4, requires_grad=True), head,
                                                   torch.randint(0, 7, (2, 3)), None, torch.randn(2))
    loss.backward()
    assert head.weight.grad is None


class _LoraLinear(nn.Module):
    """peft-style LoRA layer: base_layer + lora_A / lora_B ModuleDicts."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, base.out_features, bias=False)})
        self.weight = base.weight  # peft exposes the base weight too


class _ModulesToSave(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.original_module = base
        self.modules_to_save = nn.ModuleDict({"default": nn.Linear(base.in_features, base.out_features)})


@pytest.mark.parametrize("wrap", ["lora", "base_layer_only", "modules_to_save"])
def test_lora_lm_head_raises(wrap):
    base = nn.Linear(4, 7)
    base.requires_grad_(False)
    if wrap == "lora":
        head = _LoraLinear(base)
    elif wrap == "base_layer_only":
        head = nn.Module()
        head.base_layer = base
        head.weight = base.weight
    else:
        head = _ModulesToSave(base)
    with pytest.raises(ValueError, match="LoRA|peft|ModulesToSaveWrapper"):
        FusedLinearGRPOLoss(backend="torch")(torch.randn(2, 3, 4), head, torch.randint(0, 7, (2, 3)), None,
                                             torch.randn(2))
    with pytest.raises(ValueError, match="lm_head"):
        resolve_lm_head(head)


# ---------------------------------------------------------------------------------------------
# bad inputs


def _bad_args():
    h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    ids, mask, adv = torch.randint(0, 7, (2, 3)), torch.ones(2, 3, dtype=torch.bool), torch.randn(2)
    return dict(hidden=h, weight=w, ids=ids, mask=mask, adv=adv)


BAD = [
    (dict(weight=torch.randn(7, 5)), "must end in H"),
    (dict(weight=torch.randn(7)), r"\[V, H\]"),
    (dict(ids=torch.randint(0, 7, (2, 4))), "does not match"),
    (dict(ids=torch.rand(2, 3)), "int32/int64"),
    (dict(hidden=torch.randint(0, 3, (2, 3, 4))), "float tensor"),
    (dict(hidden=torch.randn(6, 4), ids=torch.randint(0, 7, (6,)), mask=None), "padded layout needs"),
    (dict(mask=torch.ones(2, 4)), "attention_mask"),
    (dict(adv=torch.randn(3)), "advantages"),
    (dict(ids=torch.full((2, 3), 7)), "targets must lie in"),
    (dict(weight="not a tensor"), "lin_weight"),
]


@pytest.mark.parametrize("kw,needle", BAD, ids=[n for _, n in BAD])
def test_bad_inputs_raise(kw, needle):
    a = _bad_args()
    a.update(kw)
    with pytest.raises(ValueError, match=needle):
        fused_linear_grpo_loss(a["hidden"], a["weight"], a["ids"], a["mask"], a["adv"], backend="torch")


@pytest.mark.parametrize("kw,needle", [
    (dict(loss_type="vespo", vespo_k_neg=float("inf")), "vespo_k_neg"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(epsilon_low=-1.0), "eps_low"), (dict(temperature=0.0), "temperature"), (dict(chunk_size=0), "chunk_size"),
    (dict(backend="cuda"), "backend"), (dict(delta=-1.0, loss_type="grpo"), "delta"),
])
def test_bad_constructor_raises(kw, needle):
    with pytest.raises(ValueError, match=needle):
        FusedLinearGRPOLoss(**kw)
    with pytest.raises(TypeError, match="epsilonn"):
        FusedLinearGRPOLoss(epsilonn=0.2)


# ---------------------------------------------------------------------------------------------
# Liger parity (same constructor and forward arguments: replacing Liger is a one-line change)

LIGER_CONFIGS = [
    dict(loss_type="dapo", beta=0.0),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, temperature=0.7),
    dict(loss_type="bnpo", beta=0.04, epsilon_low=0.1, epsilon_high=0.3),
    dict(loss_type="dr_grpo", beta=0.0, max_completion_length=12),
    dict(loss_type="cispo", beta=0.0, epsilon_high=1.2),
    dict(loss_type="sapo", beta=0.04),
    dict(loss_type="dapo", beta=0.04, delta=1.5),
    dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence"),
    dict(loss_type="dapo", beta=0.0, importance_sampling_level="sequence"),
]


@needs_liger
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("cfg", LIGER_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_liger_parity(cfg, with_bias, gen):
    c = make_case(gen, B=3, T=6, H=16, V=41, dtype=torch.float32, bias=with_bias, opts=cfg)
    c["adv"] = c["adv"].float()
    kw = dict(cfg, use_ref_model=cfg["beta"] != 0.0)
    kw.setdefault("use_bias_correction_kl", False)  # explicit: the two defaults differ
    seq = cfg.get("importance_sampling_level") == "sequence"
    results = []
    for cls, extra in ((LigerFusedLinearGRPOLoss, dict(compiled=False, chunk_size=1)), (FusedLinearGRPOLoss, {})):
        mod = cls(**kw, **extra)
        h, w = leaf(c["hidden"]), leaf(c["weight"])
        b = leaf(c["bias"]) if with_bias else None
        loss, metrics = mod(h, w, c["ids"].clamp(min=0), c["mask"], c["adv"], b, c["ref"] if cfg["beta"] else None,
                            c["old"])
        loss.backward()
        results.append((loss.detach(), tuple(metrics), h.grad, w.grad, b.grad if with_bias else None))
    (ll, lm, lgh, lgw, lgb), (ol, om, ogh, ogw, ogb) = results
    assert abs(ll.item() - ol.item()) <= 1e-5 * max(1.0, abs(ll.item())), f"loss liger {ll.item()} ours {ol.item()}"
    assert len(lm) == len(om)
    if cfg["beta"]:
        assert abs(lm[0].item() - om[0].item()) <= 1e-5 * max(1.0, abs(lm[0].item())), "kl"
    if not seq:  # Liger's sequence-level clip fraction is token-weighted, TRL's counts sequences
        assert abs(lm[-1].item() - om[-1].item()) <= 1e-6, "clip ratio"
    for name, a, b_ in (("hidden", lgh, ogh), ("weight", lgw, ogw), ("bias", lgb, ogb)):
        if a is None:
            assert b_ is None
            continue
        s = a.abs().max().item()
        torch.testing.assert_close(b_, a, rtol=1e-4, atol=1e-5 * s + 1e-7, msg=lambda m, n=name: f"grad {n}: {m}")


# ---------------------------------------------------------------------------------------------
# grpo_loss's backend dispatch and its torch path


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grpo_loss_torch_backend(dtype, packed, gen, monkeypatch):
    """backend='torch': the reference in the input's precision (bf16 -> fp32), both layouts, no
    host sync (no .item() / .tolist() / bool() on a tensor anywhere in forward or backward)."""
    B, T = 4, 11
    opts = dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence",
                vllm_importance_sampling_mode="sequence_truncate")
    logp = (-torch.rand(B, T, generator=gen, dtype=F64) * 3)
    old = logp - torch.randn(B, T, generator=gen, dtype=F64) * 0.1
    ref = logp + torch.randn(B, T, generator=gen, dtype=F64) * 0.2
    samp = old - torch.randn(B, T, generator=gen, dtype=F64) * 0.02
    adv = torch.randn(B, generator=gen, dtype=F64)
    mask = torch.rand(B, T, generator=gen) > 0.3
    kw = dict(old_logp=old, ref_logp=ref, sampling_logp=samp, mask=mask)
    cu = None
    if packed:
        lens = torch.tensor([T, 3, 0, 7])
        keep = torch.arange(T)[None, :] < lens[:, None]
        kw = {k: torch.cat([v[keep], torch.zeros(2, dtype=v.dtype)]) for k, v in kw.items()}
        logp = torch.cat([logp[keep], torch.full((2,), float("nan"), dtype=F64)])
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
    kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}
    lp = logp.to(dtype).requires_grad_(True)

    def boom(*a, **k):
        raise AssertionError("host sync in grpo_loss(backend='torch')")

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            mp.setattr(torch.Tensor, name, boom)
        loss, metrics = grpo_loss(lp, advantages=adv.to(dtype) if dtype != torch.bfloat16 else adv.float(),
                                  cu_seqlens=cu, backend="torch", **kw, **opts)
        loss.backward()
    assert loss.dtype == (F64 if dtype == F64 else torch.float32) and lp.grad.dtype == dtype
    lr = lp.detach().to(F64).requires_grad_(True)
    rloss, rmetrics = grpo_loss_reference(lr, advantages=adv, cu_seqlens=cu, **kw, **opts)
    rloss.backward()
    tol = 1e-12 if dtype == F64 else 2e-6
    assert abs(loss.item() - rloss.item()) <= tol * max(1, abs(rloss.item()))
    assert set(metrics) == set(rmetrics)
    gtol = 1e-10 if dtype == F64 else (1e-5 if dtype == torch.float32 else 2e-2)
    torch.testing.assert_close(lp.grad.to(F64), lr.grad.to(dtype).to(F64), rtol=gtol, atol=gtol * 1e-2)
    if packed:
        assert (lp.grad[-2:] == 0).all()


def test_grpo_loss_backend_dispatch(monkeypatch):
    lp = torch.randn(2, 5, dtype=F64)
    adv = torch.randn(2, dtype=F64)
    # the torch path computes in fp64 for fp64 inputs; the kernel in fp32
    assert grpo_loss(lp, advantages=adv, backend="torch")[0].dtype == F64
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert grpo_loss(lp, advantages=adv)[0].dtype == F64  # auto on CPU without the interpreter: torch
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        grpo_loss(lp, advantages=adv, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        grpo_loss(lp, advantages=adv, backend="cuda")
    with pytest.raises(ValueError, match="block_size"):
        grpo_loss(lp, advantages=adv, backend="torch", block_size=48)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert grpo_loss(lp, advantages=adv)[0].dtype == torch.float32  # auto under the interpreter: Triton


# ---------------------------------------------------------------------------------------------
# FSDP2: the lm_head weight is a DTensor shard (2 gloo processes vs one process)

_WORKER = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    torch.set_num_threads(1)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from staged.kernels import FusedLinearGRPOLoss

    class TinyLM(nn.Module):
        def __init__(self, V, H, tied):
            super().__init__()
            self.body = nn.Sequential(nn.Embedding(V, H), nn.Linear(H, H), nn.Tanh())
            self.lm_head = nn.Linear(H, V, bias=not tied)
            if tied:
                self.lm_head.weight = self.body[0].weight

        def forward(self, ids):
            return self.body(ids)

    def main():
        path = sys.argv[1]
        data = torch.load(os.path.join(path, "data.pt"))
        V, H, B = data["V"], data["H"], data["ids"].shape[0]
        distributed = os.environ.get("WORLD_SIZE") is not None
        if distributed:
            # A file rendezvous: a TCP port picked in advance can be taken by a concurrent job.
            dist.init_process_group("gloo", init_method="file://" + os.path.join(path, "rendezvous"),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        r, ws = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        out = {}
        for mode in ("untied", "tied", "inner"):
            torch.manual_seed(0)
            model = TinyLM(V, H, mode == "tied").double()
            if distributed:
                fully_shard(model.body[1])
                if mode == "untied":
                    fully_shard(model.lm_head)  # its own unit: its forward never runs, the weight stays a shard
                if mode == "inner":
                    fully_shard(model.body)  # called directly: the root (lm_head) never unshards
                fully_shard(model)
            lo, hi = r * B // ws, (r + 1) * B // ws
            h = model.body(data["ids"][lo:hi]) if mode == "inner" else model(data["ids"][lo:hi])
            w = model.lm_head.weight
            weight_is_dtensor = isinstance(w, DTensor)
            loss_fn = FusedLinearGRPOLoss(beta=0.04, loss_type="dapo", num_processes=ws, return_entropy=True,
                                          backend="torch")
            loss, metrics = loss_fn(h, model.lm_head, data["targets"][lo:hi], data["mask"][lo:hi],
                                    data["adv"][lo:hi], None, data["ref"][lo:hi], data["old"][lo:hi],
                                    num_items_in_batch=data["mask"].sum())
            loss.backward()
            g = model.lm_head.weight.grad
            out[mode] = dict(
                weight_is_dtensor=weight_is_dtensor, grad_is_dtensor=isinstance(g, DTensor),
                grad_placements=str(getattr(g, "placements", None)),
                grads={n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                       for n, p in model.named_parameters()})
        if r == 0:
            torch.save(out, os.path.join(path, "fsdp.pt" if distributed else "single.pt"))
        if distributed:
            dist.barrier()  # tear down together, or gloo may abort the rank still saving
            dist.destroy_process_group()
            # skip interpreter finalization: gloo's leftover work objects can abort it
            # (pytorch/pytorch#179291); everything is saved and flushed
            sys.stdout.flush()
            os._exit(0)

    main()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Two gloo processes with half the batch each, and one process with the whole batch, for
    three FSDP2 layouts (see test_fsdp2_dtensor_lm_head_two_ranks)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    seed = int(os.environ.get("STAGED_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    path = tmp_path_factory.mktemp("fsdp2")
    V, H, B, T = 19, 8, 4, 5
    data = dict(V=V, H=H, ids=torch.randint(0, V, (B, T), generator=gen),
                targets=torch.randint(0, V, (B, T), generator=gen), mask=torch.rand(B, T, generator=gen) > 0.25,
                adv=torch.randn(B, generator=gen, dtype=F64),
                old=-torch.rand(B, T, generator=gen, dtype=F64) * 3 - 1.5,
                ref=-torch.rand(B, T, generator=gen, dtype=F64) * 3 - 1.5)
    torch.save(data, path / "data.pt")
    script = path / "worker.py"
    script.write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(script), str(path)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    single = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                            timeout=180)
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert single.returncode == 0, single.stdout + single.stderr
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return torch.load(path / "single.pt"), torch.load(path / "fsdp.pt")


@pytest.mark.parametrize("mode", ["untied", "tied", "inner"])
def test_fsdp2_dtensor_lm_head_two_ranks(mode, fsdp_runs):
    """fully_shard a tiny LM and compute the loss through the module with the lm_head, on two gloo
    processes with half the batch each: every gradient equals the one-process gradient on the
    whole batch (dapo with a global num_items_in_batch, so the rank mean is the full loss).
    untied: the lm_head is its own FSDP unit whose forward never runs, so its weight is a DTensor
            shard, gathered with autograd; its gradient comes back as a Shard(0) DTensor.
    tied:   lm_head.weight is the embedding's, in the root unit: FSDP has unsharded it for the
            root forward and reduces the summed gradient of both uses itself.
    inner:  the README recipe: the backbone is an FSDP unit called directly (the root's forward,
            holding the lm_head, never runs), as when calling model.model(...) of an HF model."""
    single, fsdp = fsdp_runs
    ref, got = single[mode], fsdp[mode]
    if mode in ("untied", "inner"):
        assert got["weight_is_dtensor"] and got["grad_is_dtensor"] and "Shard(dim=0)" in got["grad_placements"], got
    else:
        assert not got["weight_is_dtensor"]
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        assert g is not None and got["grads"][name] is not None, name
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
