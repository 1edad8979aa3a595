"""Plain-PyTorch GRPO loss, written the way TRL writes it (trl 1.16 ``GRPOTrainer._compute_loss``),
in float64 by default. Tests hold the Triton kernel against it (values and autograd gradients);
benchmarks time it in float32 as the eager baseline and under ``torch.compile``.

It deliberately shares nothing with the kernel except option parsing and input validation
(``staged.kernels.grpo_options``), so a semantic slip in the kernel cannot hide here. The packed
layout is scattered into a padded [B, T_max] batch first, which reads ``cu_seqlens`` on the host:
a sync that is fine for a reference and absent from the kernel.

Where it departs from TRL it departs exactly like the kernel, on purpose (see
``staged.kernels.grpo_loss`` for the list): every ``exp`` argument is clamped to at most
``EXP_CLAMP`` so that extreme log-ratios stay finite, and inputs at masked positions are zeroed
before use so that garbage in padding (NaN, inf) never reaches the loss or the gradient.
"""
from __future__ import annotations

import torch

from ..grpo_options import (check_num_items, prepare_inputs, resolve_options,
                            resolve_tensor_aliases, split_kwargs)

# Upper clamp on every exp() argument (log-ratios, ref log-ratios, vLLM log-ratios): verl's
# "safe exp" bound. exp(20) = 4.85e8, so products such as the bias-corrected KL (kl * ratio,
# <= e^40) and sums over a million tokens stay far from fp32's 3.4e38. The kernel reads it from here.
EXP_CLAMP = 20.0


def _padded(x, idx, inside, fill=0.0):
    """[N] -> [B, T_max] by gather (differentiable); positions past a row's end get ``fill``."""
    if x is None:
        return None
    g = x[idx]
    return torch.where(inside, g, torch.as_tensor(fill, dtype=g.dtype, device=g.device))


def grpo_loss_reference(logp, old_logp=None, ref_logp=None, advantages=None, mask=None, *,
                        cu_seqlens=None, sampling_logp=None, vllm_is_ratio=None,
                        num_items_in_batch=None, block_size=None, dtype=torch.float64, **kwargs):
    """Same signature and return value as ``staged.kernels.grpo_loss`` (plus ``dtype``, the
    compute precision; ``block_size``, a kernel tuning knob, is accepted and ignored).
    Returns ``(loss, metrics)``; differentiate ``loss`` with autograd."""
    tensor_aliases, option_kwargs = split_kwargs(kwargs)
    named = resolve_tensor_aliases(
        dict(old_logp=old_logp, ref_logp=ref_logp, mask=mask, sampling_logp=sampling_logp,
             vllm_is_ratio=vllm_is_ratio), tensor_aliases)
    opts = resolve_options(option_kwargs)
    inp = prepare_inputs(opts, logp, named["old_logp"], named["ref_logp"], advantages, named["mask"],
                         cu_seqlens, named["sampling_logp"], named["vllm_is_ratio"])
    num_items_in_batch = check_num_items(num_items_in_batch)
    dev, B = logp.device, inp.B

    # ---- layout: everything becomes [B, T] with a float mask (0 past each row's end) ----
    if inp.packed:
        cu = inp.cu_seqlens.tolist()  # host sync: fine in a reference
        lens = [cu[i + 1] - cu[i] for i in range(B)]
        T = max(max(lens), 1)
        ar = torch.arange(T, device=dev)
        starts = torch.tensor(cu[:-1], device=dev)
        inside = ar[None, :] < torch.tensor(lens, device=dev)[:, None]
        idx = (starts[:, None] + ar[None, :]).clamp(max=max(inp.N - 1, 0))
    else:
        T = inp.T
        idx = torch.arange(B * T, device=dev).view(B, T)
        inside = torch.ones(B, T, dtype=torch.bool, device=dev)

    def tok(x):
        return None if x is None else _padded(x.to(dtype), idx, inside)

    logp_flat = inp.logp
    per_token_logps = _padded(logp_flat.to(dtype), idx, inside)
    m = torch.ones(inp.N, dtype=dtype, device=dev) if inp.mask is None else inp.mask.to(dtype)
    m = _padded(m, idx, inside)
    valid = m != 0

    def clean(x):  # masked positions never reach the math (the kernel zeroes them at load time)
        return None if x is None else torch.where(valid, x, torch.zeros((), dtype=dtype, device=dev))

    per_token_logps = clean(per_token_logps)
    old = clean(tok(inp.old_logp))
    old = per_token_logps.detach() if old is None else old
    advantages = inp.advantages.to(dtype).unsqueeze(1)  # [B, 1]

    # ---- vLLM importance-sampling correction (TRL builds it in _generate_and_score_completions) ----
    is_ratio = None
    if inp.sampling_logp is not None:
        samp = clean(tok(inp.sampling_logp))
        diff = torch.nan_to_num((old.detach() - samp) * m, nan=0.0)
        if opts.vllm_is_sequence:
            diff = diff.sum(dim=-1, keepdim=True)
        is_ratio = torch.exp(diff.clamp(max=EXP_CLAMP))
        lo, hi = opts.vllm_importance_sampling_clip_min, opts.vllm_importance_sampling_clip_max
        if opts.vllm_is_truncate:
            is_ratio = torch.clamp(is_ratio, min=lo, max=hi)
        else:
            lo = -float("inf") if lo is None else lo
            hi = float("inf") if hi is None else hi
            is_ratio = is_ratio.masked_fill((is_ratio < lo) | (is_ratio > hi), 0.0)
    elif inp.is_ratio_token is not None:
        is_ratio = clean(tok(inp.is_ratio_token))
    elif inp.is_ratio_row is not None:
        is_ratio = inp.is_ratio_row.to(dtype).unsqueeze(1)

    # ---- TRL's _compute_loss, line for line (exp arguments clamped) ----
    log_ratio = per_token_logps - old
    if opts.importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights.clamp(max=EXP_CLAMP))
    ratio_for_metric = coef_1.detach()

    if opts.beta != 0.0:
        ref = clean(tok(inp.ref_logp))
        d = ref - per_token_logps
        per_token_kl = torch.exp(d.clamp(max=EXP_CLAMP)) - d - 1
        if opts.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    eps_low, eps_high = opts.eps_low, opts.eps_high
    is_low_clipped = is_high_clipped = None
    if opts.loss_type == "cispo":
        if opts.cispo_variant == "trl":
            clamped_ratios = torch.clamp(coef_1, max=eps_high).detach()
            is_low_clipped = torch.zeros_like(coef_1, dtype=torch.bool)
            is_high_clipped = (coef_1 > eps_high) & (advantages > 0)
        else:  # verl: two-sided, relative bounds, no advantage condition in its clip fraction
            clamped_ratios = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high).detach()
            is_low_clipped = coef_1 < 1 - eps_low
            is_high_clipped = coef_1 > 1 + eps_high
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif opts.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
        is_low_clipped = torch.zeros_like(coef_1, dtype=torch.bool)
        is_high_clipped = torch.zeros_like(coef_1, dtype=torch.bool)
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if opts.delta is not None:
            coef_1 = torch.clamp(coef_1, max=opts.delta)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
        # TRL measures clipping on coef_1 after the delta cap
        is_low_clipped = (coef_1 < 1 - eps_low) & (advantages < 0)
        is_high_clipped = (coef_1 > 1 + eps_high) & (advantages > 0)

    if is_ratio is not None:
        per_token_loss = per_token_loss * is_ratio
    if opts.beta != 0.0:
        per_token_loss = per_token_loss + opts.beta * per_token_kl

    ga = opts.gradient_accumulation_steps
    lt = opts.loss_type
    if lt in ("grpo", "sapo"):
        loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / ga
    elif lt == "bnpo":
        loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0) / ga
    elif lt == "dr_grpo":
        loss = (per_token_loss * m).sum() / (B * opts.max_completion_length) / ga
    elif lt in ("cispo", "dapo"):
        n = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=dev)
        normalizer = n.to(dtype).clamp(min=1.0) / opts.num_processes
        normalizer = normalizer * ga / opts.steps_per_generation
        loss = (per_token_loss * m).sum() / normalizer
    elif lt == "luspo":
        loss = (per_token_loss * m).sum(-1).mean() / ga
    else:  # pragma: no cover - options already validated
        raise ValueError(lt)

    # ---- metrics, as TRL's global_masked_mean (one process) ----
    def masked_mean(x, per_sequence):
        # TRL tests x.shape[1] == 1 for "one value per sequence", which also fires for token-level
        # values when T == 1; we go by the importance-sampling level instead
        if per_sequence:  # sequence level: one value per sequence, all sequences counted
            return x.sum() / max(x.shape[0], 1)
        return (x * m).sum() / m.sum().clamp(min=1.0)

    seq = opts.sequence_level

    with torch.no_grad():
        low = is_low_clipped.to(dtype)
        high = is_high_clipped.to(dtype)
        metrics = {
            "clip_ratio/low_mean": masked_mean(low, seq),
            "clip_ratio/high_mean": masked_mean(high, seq),
            "clip_ratio/region_mean": masked_mean((is_low_clipped | is_high_clipped).to(dtype), seq),
            "ratio_mean": masked_mean(ratio_for_metric, seq),
            "num_tokens": m.sum(),
        }
        if opts.beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl.detach(), False)
    return loss, metrics
