"""Parity of staged.kernels.grpo_loss with the trainers it replaces, on the same fp32 inputs.

* TRL (trl 1.16): ``GRPOTrainer._compute_loss`` itself, on a trainer object built without
  ``__init__`` (no model download) whose ``_get_per_token_logps_and_entropies`` returns our
  tensors. The vLLM importance ratio is built by TRL's own code too: the block of
  ``_generate_and_score_completions`` that computes it is cut out of TRL's source and run.
* Liger-Kernel: the chunked loss's ``ppo_loss_fn`` and the full ``LigerFusedLinearGRPOLoss`` (plain
  torch, they run on CPU), and the Triton ``triton_grpo_loss`` (CUDA only).

A parity target that cannot be called skips with the reason; it never passes silently.
"""
from __future__ import annotations

import inspect
import math
import os
import random
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from staged.kernels import grpo_loss
from staged.kernels.reference.grpo_loss import EXP_CLAMP

try:
    from trl import GRPOTrainer
    _TRL_ERR = None
except Exception as exc:  # noqa: BLE001 - any import failure means: skip with the reason
    GRPOTrainer, _TRL_ERR = None, f"trl not importable: {type(exc).__name__}: {exc}"

try:
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction, LigerFusedLinearGRPOLoss
    _LIGER_ERR = None
except Exception as exc:  # noqa: BLE001
    LigerFusedLinearGRPOFunction = LigerFusedLinearGRPOLoss = None
    _LIGER_ERR = f"liger_kernel not importable: {type(exc).__name__}: {exc}"

needs_trl = pytest.mark.skipif(GRPOTrainer is None, reason=_TRL_ERR or "")
needs_liger = pytest.mark.skipif(LigerFusedLinearGRPOFunction is None, reason=_LIGER_ERR or "")

LOSS_TOL = 1e-6  # TRL parity in fp32: |loss - loss_trl| <= 1e-6 (absolute and relative to max(1, |loss|))


@pytest.fixture
def gen():
    seed = int(os.environ.get("STAGED_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _away(x, kinks, gap=1e-4):
    for k in kinks:
        x = torch.where((x - k).abs() < gap, x + 3 * gap, x)
    return x


def make_batch(gen, B, T, opts, *, with_old=True, vllm_mode=None):
    """fp32 padded inputs with log-ratios kept clear of every clip threshold: TRL and the kernel
    round differently (both fp32) and must not land on different sides of one."""
    eps_low = opts.get("eps_low", 0.2)
    eps_high = opts.get("eps_high", eps_low)
    kinks = [math.log(1 + eps_high), EXP_CLAMP]
    if eps_low < 1:
        kinks.append(math.log(1 - eps_low))
    if opts.get("loss_type") == "cispo":
        kinks.append(math.log(eps_high))
    if opts.get("delta") is not None:
        kinks.append(math.log(opts["delta"]))
    is_kinks = [math.log(v) for v in (opts.get("vllm_importance_sampling_clip_min"),
                                      opts.get("vllm_importance_sampling_clip_max", 3.0)) if v]
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    mask = (torch.rand(B, T, generator=gen) > 0.2).long()  # TRL's completion_mask is int64
    mask[:, 0] = 1
    x = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.25 + torch.randn(B, 1, generator=gen, dtype=torch.float64) * 0.3
    m = mask.double()
    if opts.get("importance_sampling_level") == "sequence":
        lw = (x * m).sum(-1) / m.sum(-1)
        x = x + (_away(lw, kinks) - lw)[:, None]
    else:
        x = _away(x, kinks)
    old = (logp - x) if with_old else None
    sampling = None
    if vllm_mode is not None:
        d = torch.randn(B, T, generator=gen, dtype=torch.float64) * (0.05 if vllm_mode.startswith("sequence") else 0.15)
        if vllm_mode.startswith("sequence"):
            D = (d * m).sum(-1)
            d[:, 0] += _away(D, is_kinks) - D
        else:
            d = _away(d, is_kinks)
        sampling = (old if with_old else logp) - d
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return dict(logp=f(logp), old=f(old), ref=f(logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3),
                adv=torch.randn(B, generator=gen), mask=mask, sampling=f(sampling))


# ---------------------------------------------------------------------------------------------
# TRL


def _trl_is_ratio_code():
    """The statements of GRPOTrainer._generate_and_score_completions that build the vLLM
    importance-sampling ratio, as source (None if TRL's code no longer has that shape)."""
    try:
        lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
        start = next(i for i, ln in enumerate(lines)
                     if ln.strip() == "if self.use_vllm and self.vllm_importance_sampling_correction:"
                     and "mask = completion_mask" in lines[i + 1])
    except (StopIteration, OSError, TypeError, AttributeError):
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    code = textwrap.dedent("\n".join(lines[start:end]))
    return code if "vllm_importance_sampling_ratio" in code else None


def _trl_trainer(opts, logp_leaf, *, vllm_mode=None, ga=1, num_processes=1, spg=None):
    t = object.__new__(GRPOTrainer)  # no __init__: no model, no accelerator
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp_leaf, torch.zeros_like(logp_leaf), None)
    t.aux_loss_enabled = False
    t.top_entropy_quantile = 1.0
    t.off_policy_mask_threshold = None
    t._entropy_bonus_enabled = False
    t.importance_sampling_level = opts.get("importance_sampling_level", "token")
    t.beta = opts.get("beta", 0.0)
    t.loss_type = opts["loss_type"]
    t.epsilon_low = opts.get("eps_low", 0.2)
    t.epsilon_high = opts.get("eps_high", t.epsilon_low)
    t.max_completion_length = opts.get("max_completion_length", 512)
    t.args = SimpleNamespace(delta=opts.get("delta"), use_bias_correction_kl=opts.get("use_bias_correction_kl", True),
                             sapo_temperature_pos=opts.get("sapo_temperature_pos", 1.0),
                             sapo_temperature_neg=opts.get("sapo_temperature_neg", 1.05),
                             vespo_k_pos=opts.get("vespo_k_pos", 2.0), vespo_lambda_pos=opts.get("vespo_lambda_pos", 3.0),
                             vespo_k_neg=opts.get("vespo_k_neg", 3.0), vespo_lambda_neg=opts.get("vespo_lambda_neg", 2.0),
                             steps_per_generation=spg or ga)
    t.use_vllm = vllm_mode is not None
    t.vllm_importance_sampling_correction = True
    t.vllm_importance_sampling_mode = vllm_mode
    t.vllm_importance_sampling_clip_min = opts.get("vllm_importance_sampling_clip_min")
    t.vllm_importance_sampling_clip_max = opts.get("vllm_importance_sampling_clip_max", 3.0)
    t.model = SimpleNamespace(training=True)
    t.current_gradient_accumulation_steps = ga
    t.accelerator = SimpleNamespace(num_processes=num_processes, sync_gradients=True,
                                    gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction="sum": x)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t


def trl_loss(batch, opts, *, vllm_mode=None, ga=1, num_processes=1, spg=None, num_items=None):
    """(loss, d loss / d logp, TRL's logged metrics) from TRL's own _compute_loss."""
    lp = batch["logp"].clone().requires_grad_(True)
    t = _trl_trainer(opts, lp, vllm_mode=vllm_mode, ga=ga, num_processes=num_processes, spg=spg)
    B, T = lp.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": batch["mask"],
        "advantages": batch["adv"],
        "num_items_in_batch": torch.tensor(float(batch["mask"].sum() if num_items is None else num_items)),
    }
    if batch["old"] is not None:
        inputs["old_per_token_logps"] = batch["old"]
    if t.beta != 0.0:
        inputs["ref_per_token_logps"] = batch["ref"]
    if vllm_mode is not None:
        code = _trl_is_ratio_code()
        if code is None:
            pytest.skip("TRL's vLLM importance-ratio block was not found in "
                        "GRPOTrainer._generate_and_score_completions (TRL changed); cannot run TRL's own code")
        scope = dict(self=t, completion_mask=batch["mask"], tool_mask=None, torch=torch, math=math,
                     old_per_token_logps=batch["old"] if batch["old"] is not None else lp.detach(),
                     sampling_per_token_logps=batch["sampling"])
        exec(compile(code, "<trl vllm IS ratio>", "exec"), scope)  # noqa: S102 - TRL's own source
        inputs["importance_sampling_ratio"] = scope["vllm_importance_sampling_ratio"]
    loss = t._compute_loss(None, inputs)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g, {k: v[-1] for k, v in t._metrics["train"].items()}


def ours(batch, opts, *, vllm_mode=None, device="cpu", **extra):
    lp = batch["logp"].clone().to(device).requires_grad_(True)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    kw = dict(opts)
    if vllm_mode is not None:
        kw.update(sampling_logp=dev(batch["sampling"]), vllm_importance_sampling_mode=vllm_mode)
    loss, metrics = grpo_loss(lp, dev(batch["old"]), dev(batch["ref"]), dev(batch["adv"]), dev(batch["mask"]), **kw, **extra)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach().cpu(), g.cpu(), {k: v.item() for k, v in metrics.items()}


def check_against_trl(ours_out, trl_out, opts):
    loss, g, m = ours_out
    tloss, tg, tm = trl_out
    # luspo scales each sequence's loss by its length, so fp32 rounding in the per-sequence
    # sums (ours and TRL's are both fp32, summed in different orders) grows with T: the same
    # 1e-6 bound then holds per token, not for the length-weighted total.
    scale = g.shape[-1] if opts["loss_type"] == "luspo" else 1.0
    assert abs(loss.item() - tloss.item()) <= LOSS_TOL * scale * max(1.0, abs(tloss.item())), \
        f"loss {loss.item():.9g} vs TRL {tloss.item():.9g}"
    gmax = tg.abs().max().item()
    torch.testing.assert_close(g, tg, rtol=1e-5, atol=1e-6 * max(gmax, 1e-3),
                               msg=lambda s: f"gradient vs TRL (max |g| {gmax:.3g}): {s}")
    # TRL's logged metrics
    if opts.get("beta", 0.0) != 0.0:
        assert m["kl"] == pytest.approx(tm["kl"], rel=1e-5, abs=1e-7)
    if opts["loss_type"] == "cispo":
        assert m["clip_ratio/high_mean"] == pytest.approx(tm["cispo_clip_ratio"], abs=1e-6)
    elif opts["loss_type"] == "vespo":
        assert m["vespo/phi_seq_mean"] == pytest.approx(tm["vespo/phi_seq_mean"], rel=1e-5, abs=1e-7)
    elif opts["loss_type"] != "sapo":
        for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert m[k] == pytest.approx(tm[k], abs=1e-6), k


TRL_LOSSES = ([dict(loss_type=t) for t in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")]
              + [dict(loss_type="grpo", delta=1.4), dict(loss_type="dapo", delta=1.1, eps_high=0.28),
                 dict(loss_type="cispo", eps_high=1.3), dict(loss_type="sapo"),
                 # delta set where TRL ignores it; vespo with small weights so that phi is O(1)
                 dict(loss_type="sapo", delta=1.5), dict(loss_type="cispo", eps_high=1.3, delta=2.0),
                 dict(loss_type="vespo"), dict(loss_type="vespo", vespo_k_pos=0.5, vespo_lambda_pos=0.2,
                                               vespo_k_neg=0.3, vespo_lambda_neg=0.1)])
TRL_KL = [dict(beta=0.0), dict(beta=0.04, use_bias_correction_kl=True), dict(beta=0.04, use_bias_correction_kl=False)]
TRL_VLLM = [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
TRL_GRID = [(lc, lvl, kc, vm) for lc in TRL_LOSSES for lvl in ("token", "sequence") for kc in TRL_KL for vm in TRL_VLLM]


def _tid(lc, lvl, kc, vm):
    parts = [f"{k}={v}" for k, v in lc.items()] + [lvl] + [f"{k}={v}" for k, v in kc.items()] + [vm or "no_vllm"]
    return "-".join(parts)


@needs_trl
@pytest.mark.parametrize("case", range(len(TRL_GRID)), ids=[_tid(*c) for c in TRL_GRID])
def test_trl_parity(case, gen, device):
    lc, level, kc, vllm_mode = TRL_GRID[case]
    opts = dict(lc, importance_sampling_level=level, **kc)
    if opts["loss_type"] == "dr_grpo":
        opts["max_completion_length"] = 40
    if vllm_mode is not None and case % 2:
        opts.update(vllm_importance_sampling_clip_min=0.8, vllm_importance_sampling_clip_max=1.25)
    B, T = 4, 11 + case % 17
    batch = make_batch(gen, B, T, opts, with_old=case % 4 != 0, vllm_mode=vllm_mode)
    if opts["loss_type"] == "vespo" and vllm_mode is not None and vllm_mode.startswith("sequence"):
        with pytest.raises(ValueError, match="vespo"):  # TRL's GRPOTrainer raises at __init__
            ours(batch, opts, vllm_mode=vllm_mode, device=device)
        return
    trl_out = trl_loss(batch, opts, vllm_mode=vllm_mode)
    out = ours(batch, opts, vllm_mode=vllm_mode, device=device)
    check_against_trl(out, trl_out, opts)


@needs_trl
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
def test_trl_parity_accumulation_and_processes(loss_type, gen, device):
    """TRL's train-mode normalisers: gradient accumulation, processes, steps_per_generation and
    num_items_in_batch (a generation batch larger than this micro-batch)."""
    opts = dict(loss_type=loss_type, beta=0.02, max_completion_length=30)
    if loss_type == "cispo":
        opts["eps_high"] = 4.0
    batch = make_batch(gen, 3, 17, opts)
    n_items = int(batch["mask"].sum()) * 5 + 3
    trl_out = trl_loss(batch, opts, ga=4, num_processes=2, spg=8, num_items=n_items)
    out = ours(batch, opts, device=device, gradient_accumulation_steps=4, num_processes=2, steps_per_generation=8,
               num_items_in_batch=torch.tensor(n_items))
    check_against_trl(out, trl_out, opts)


@needs_trl
def test_trl_parity_precomputed_ratio(gen, device):
    """A ratio TRL built, passed to us as ``importance_sampling_ratio`` (TRL's inputs key)."""
    opts = dict(loss_type="dapo", beta=0.04)
    for mode in ("token_mask", "sequence_truncate"):
        batch = make_batch(gen, 3, 13, opts, vllm_mode=mode)
        trl_out = trl_loss(batch, opts, vllm_mode=mode)
        code = _trl_is_ratio_code()
        t = _trl_trainer(opts, batch["logp"], vllm_mode=mode)
        scope = dict(self=t, completion_mask=batch["mask"], tool_mask=None, torch=torch, math=math,
                     old_per_token_logps=batch["old"], sampling_per_token_logps=batch["sampling"])
        exec(compile(code, "<trl vllm IS ratio>", "exec"), scope)  # noqa: S102
        out = ours(batch, opts, device=device, importance_sampling_ratio=scope["vllm_importance_sampling_ratio"].to(device))
        check_against_trl(out, trl_out, opts)


# ---------------------------------------------------------------------------------------------
# Liger-Kernel (chunked loss: torch, runs on CPU)


def _liger_kwargs(opts):
    return dict(epsilon_low=opts.get("eps_low", 0.2), epsilon_high=opts.get("eps_high", opts.get("eps_low", 0.2)),
                beta=opts.get("beta", 0.0), loss_type=opts["loss_type"],
                max_completion_length=opts.get("max_completion_length"),
                importance_sampling_level=opts.get("importance_sampling_level", "token"),
                delta=opts.get("delta"), use_bias_correction_kl=opts.get("use_bias_correction_kl", True))


# Liger's luspo is not TRL's (see test_liger_luspo_differs_from_trl); cispo/sapo at sequence level
# raise in Liger.
LIGER_GRID = [(lt, lvl, beta, bias, delta, ratio)
              for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
              for lvl in ("token", "sequence") if not (lvl == "sequence" and lt in ("cispo", "sapo"))
              for beta, bias in ((0.0, False), (0.04, True), (0.04, False))
              for delta in ((None, 1.5) if lt in ("grpo", "dapo") else (None,))
              for ratio in (None, "token", "row")]


@needs_liger
@pytest.mark.parametrize("lt,level,beta,bias,delta,ratio", LIGER_GRID)
def test_liger_ppo_loss_fn_parity(lt, level, beta, bias, delta, ratio, gen, device):
    opts = dict(loss_type=lt, importance_sampling_level=level, beta=beta, use_bias_correction_kl=bias, delta=delta)
    if lt == "dr_grpo":
        opts["max_completion_length"] = 24
    if lt == "cispo":
        opts["eps_high"] = 1.3
    batch = make_batch(gen, 4, 15, opts)
    B, T = batch["logp"].shape
    isr = None
    if ratio == "token":
        isr = torch.rand(B, T, generator=gen) + 0.5
    elif ratio == "row":
        isr = torch.rand(B, 1, generator=gen) + 0.5
    lp = batch["logp"].clone().requires_grad_(True)
    mask = batch["mask"].float()
    lloss, lmetrics = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        per_token_logps=lp, attention_mask=mask, advantages=batch["adv"], full_attention_mask=mask,
        ref_per_token_logps=batch["ref"] if beta else None, old_per_token_logps=batch["old"],
        vllm_is_ratio=isr, **_liger_kwargs(opts))
    (lg,) = torch.autograd.grad(lloss, lp)
    loss, g, m = ours(batch, opts, device=device, vllm_is_ratio=None if isr is None else isr.to(device))
    assert abs(loss.item() - lloss.item()) <= LOSS_TOL * max(1.0, abs(lloss.item()))
    torch.testing.assert_close(g, lg, rtol=1e-5, atol=1e-6 * max(lg.abs().max().item(), 1e-3))
    if beta:
        assert m["kl"] == pytest.approx(lmetrics[0].item(), rel=1e-5, abs=1e-7)
    if level == "token":  # Liger's sequence-level clip fraction is token-weighted, TRL's counts sequences
        assert m["clip_ratio/region_mean"] == pytest.approx(lmetrics[-1].item(), abs=1e-6)


@needs_liger
@pytest.mark.parametrize("opts", [dict(loss_type="dapo", beta=0.04), dict(loss_type="grpo", importance_sampling_level="sequence"),
                                  dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False, delta=1.6),
                                  dict(loss_type="cispo", eps_high=2.0, beta=0.04)],
                         ids=["dapo-kl", "grpo-seq", "bnpo-kl-delta", "cispo-kl"])
def test_liger_fused_linear_grpo_parity(opts, gen, device):
    """End to end through Liger's LigerFusedLinearGRPOLoss (hidden @ lm_head -> loss): our logp
    (plain log_softmax) into grpo_loss gives the same loss and the same hidden/weight gradients."""
    B, T, H, V, temp = 3, 7, 16, 37, 0.7
    batch = make_batch(gen, B, T, opts)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.3
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = batch["mask"]
    lk = _liger_kwargs(opts)
    mod = LigerFusedLinearGRPOLoss(beta=lk["beta"], compiled=False, use_ref_model=lk["beta"] != 0.0, chunk_size=1,
                                   epsilon_low=lk["epsilon_low"], epsilon_high=lk["epsilon_high"],
                                   loss_type=lk["loss_type"], importance_sampling_level=lk["importance_sampling_level"],
                                   temperature=temp, delta=lk["delta"], use_bias_correction_kl=lk["use_bias_correction_kl"])
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lloss, _ = mod(h1, w1, ids, mask, batch["adv"], ref_per_token_logps=batch["ref"] if lk["beta"] else None,
                   old_per_token_logps=batch["old"])
    lloss.backward()

    h2, w2 = hidden.clone().to(device).requires_grad_(True), weight.clone().to(device).requires_grad_(True)
    logp = torch.log_softmax((h2 @ w2.t()) / temp, dim=-1).gather(-1, ids.to(device)[..., None]).squeeze(-1)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    loss, _ = grpo_loss(logp, dev(batch["old"]), dev(batch["ref"]), dev(batch["adv"]), dev(mask), **opts)
    loss.backward()
    assert abs(loss.item() - lloss.item()) <= 1e-5 * max(1.0, abs(lloss.item()))
    torch.testing.assert_close(h2.grad.cpu(), h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad.cpu(), w1.grad, rtol=1e-4, atol=1e-6)


@needs_liger
@needs_trl
def test_liger_luspo_differs_from_trl():
    """Documents why luspo is outside the Liger parity grid: Liger averages loss * length over all
    B*T positions, unmasked; TRL 1.16 sums each sequence's masked loss and averages over
    sequences. The two agree only when the per-token loss is one value per sequence (sequence
    level, no KL, no per-token vLLM ratio), so the KL term here makes them differ."""
    opts = dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.5)
    # A fixed draw: how far the two normalisers fall apart depends on the inputs, and a random
    # draw can land within the 1e-4 below (seen once).
    batch = make_batch(torch.Generator().manual_seed(20261125), 3, 9, opts)
    lp = batch["logp"].clone().requires_grad_(True)
    mask = batch["mask"].float()
    lloss, _ = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        per_token_logps=lp, attention_mask=mask, advantages=batch["adv"], full_attention_mask=mask,
        old_per_token_logps=batch["old"], ref_per_token_logps=batch["ref"], **_liger_kwargs(opts))
    tloss, _, _ = trl_loss(batch, opts)
    oloss, _, _ = ours(batch, opts)
    assert abs(oloss.item() - tloss.item()) <= LOSS_TOL * 9 * max(1.0, abs(tloss.item()))  # luspo: per token
    assert abs(lloss.item() - tloss.item()) > 1e-3, abs(lloss.item() - tloss.item())


# ---------------------------------------------------------------------------------------------
# Liger's Triton op (needs CUDA)


@pytest.mark.cuda
@needs_liger
@pytest.mark.parametrize("opts", [dict(loss_type="dapo", beta=0.04), dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
                                  dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.04),
                                  dict(loss_type="cispo", eps_high=3.0), dict(loss_type="sapo", beta=0.02),
                                  dict(loss_type="dr_grpo", max_completion_length=64, delta=1.5)],
                         ids=["dapo", "grpo-biaskl", "bnpo-seq", "cispo", "sapo", "dr_grpo-delta"])
def test_liger_triton_parity(opts, gen):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    B, T, V, temp = 4, 33, 50, 0.9
    batch = make_batch(gen, B, T, opts)
    logits = torch.randn(B, T + 1, V, generator=gen).cuda()
    ids = torch.randint(0, V, (B, T), generator=gen).cuda()
    mask = batch["mask"].cuda()
    c = lambda t: None if t is None else t.cuda()  # noqa: E731
    lk = _liger_kwargs(opts)
    l1 = logits.clone().requires_grad_(True)
    lloss, _ = triton_grpo_loss(l1, c(batch["old"]), c(batch["ref"]), ids, c(batch["adv"]), mask, temperature=temp,
                                beta=lk["beta"], eps_low=lk["epsilon_low"], eps_high=lk["epsilon_high"], inplace=False,
                                loss_type=lk["loss_type"], max_completion_length=lk["max_completion_length"],
                                importance_sampling_level=lk["importance_sampling_level"], reduce=True,
                                delta=lk["delta"], use_bias_correction_kl=lk["use_bias_correction_kl"])
    lloss.backward()
    l2 = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(l2[:, :-1] / temp, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    loss, _ = grpo_loss(logp, c(batch["old"]), c(batch["ref"]), c(batch["adv"]), mask, **opts)
    loss.backward()
    assert abs(loss.item() - lloss.item()) <= 1e-5 * max(1.0, abs(lloss.item()))
    torch.testing.assert_close(l2.grad, l1.grad, rtol=1e-4, atol=1e-6)
