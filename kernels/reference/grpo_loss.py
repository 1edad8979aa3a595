"""Plain-PyTorch GRPO loss, written the way TRL writes it (trl 1.16 ``GRPOTrainer._compute_loss``),
in float64 by default. Tests hold the Triton kernel against it (values and autograd gradients);
benchmarks time it in float32 as the eager baseline and under ``torch.compile``.

It deliberately shares nothing with the kernel except option parsing and input validation
(``staged.kernels.grpo_options``), so a semantic slip in the kernel cannot hide here.

It is also the CPU path of ``grpo_loss(backend="torch")`` (``dtype`` = the inputs' precision), so
it has no host sync: the padded layout is viewed as [B, T]; the packed layout stays a flat [N]
token axis whose sequence of each token comes from ``searchsorted`` over ``cu_seqlens`` on the
device, and per-sequence sums are ``index_add`` over it (tokens outside every sequence count as
masked). Per-sequence values (advantages, GSPO ratios) are [B, 1] in the padded layout, as in TRL,
and gathered to [N] in the packed one.

Where it departs from TRL it departs exactly like the kernel, on purpose (see
``staged.kernels.grpo_loss`` for the list): every ``exp`` argument is clamped to at most
``EXP_CLAMP`` so that extreme log-ratios stay finite, and inputs at masked positions are zeroed
before use so that garbage in padding (NaN, inf) never reaches the loss or the gradient.
"""
from __future__ import annotations

import torch

from ..grpo_options import check_num_items, resolve_call

# Upper clamp on every exp() argument (log-ratios, ref log-ratios, vLLM log-ratios): verl's
# "safe exp" bound. exp(20) = 4.85e8, so products such as the bias-corrected KL (kl * ratio,
# <= e^40) and sums over a million tokens stay far from fp32's 3.4e38. The kernel reads it from here.
EXP_CLAMP = 20.0


class _Layout:
    """Row structure of the token axis: per-sequence sums and per-sequence -> per-token broadcast.

    padded: tokens are [B, T]; ``rowsum`` sums the last axis, ``expand`` gives [B, 1] (TRL's shapes).
    packed: tokens are [N]; ``seg`` [N] is each token's sequence (clamped into [0, B)), ``inside``
    [N] whether it belongs to one at all. Built on the device: no ``cu_seqlens`` value is read.
    """

    def __init__(self, inp, dev):
        self.B, self.packed = inp.B, inp.packed
        if inp.packed:
            cu = inp.cu_seqlens.to(torch.int64)
            pos = torch.arange(inp.N, device=dev, dtype=torch.int64)
            seg = torch.searchsorted(cu[1:], pos, right=True)  # sequence b owns cu[b] <= pos < cu[b+1]
            self.inside = (pos >= cu[0]) & (seg < inp.B)
            self.seg = seg.clamp(max=inp.B - 1)
            self.shape = (inp.N,)
        else:
            self.inside = None
            self.shape = (inp.B, inp.T)

    def tokens(self, x):
        """[N] flat input -> the token layout ([B, T] or [N])."""
        return x.reshape(self.shape)

    def rowsum(self, x):
        """Per-sequence sum of a token tensor -> [B]."""
        if not self.packed:
            return x.sum(-1)
        return torch.zeros(self.B, dtype=x.dtype, device=x.device).index_add(0, self.seg, x)

    def expand(self, v):
        """Per-sequence [B] -> broadcastable against tokens ([B, 1] padded, [N] packed)."""
        return v[self.seg] if self.packed else v.unsqueeze(1)


def grpo_loss_reference(logp, old_logp=None, ref_logp=None, advantages=None, mask=None, *,
                        cu_seqlens=None, sampling_logp=None, vllm_is_ratio=None,
                        num_items_in_batch=None, block_size=None, dtype=torch.float64, **kwargs):
    """Same signature and return value as ``staged.kernels.grpo_loss`` (plus ``dtype``, the
    compute precision; ``block_size``, a kernel tuning knob, is accepted and ignored).
    Returns ``(loss, metrics)``; differentiate ``loss`` with autograd."""
    opts, inp = resolve_call(logp, old_logp, ref_logp, advantages, mask, cu_seqlens, sampling_logp,
                             vllm_is_ratio, kwargs)
    num_items_in_batch = check_num_items(num_items_in_batch)
    dev, B = logp.device, inp.B

    # ---- layout: tokens stay [B, T] (padded) or [N] (packed), with a float mask (0 outside
    # every sequence) ----
    lay = _Layout(inp, dev)

    def tok(x):
        return None if x is None else lay.tokens(x.to(dtype))

    per_token_logps = tok(inp.logp)
    m = torch.ones(inp.N, dtype=dtype, device=dev) if inp.mask is None else inp.mask.to(dtype)
    if lay.inside is not None:
        m = torch.where(lay.inside, m, torch.zeros((), dtype=dtype, device=dev))
    m = lay.tokens(m)
    valid = m != 0

    def clean(x):  # masked positions never reach the math (the kernel zeroes them at load time)
        return None if x is None else torch.where(valid, x, torch.zeros((), dtype=dtype, device=dev))

    per_token_logps = clean(per_token_logps)
    old = clean(tok(inp.old_logp))
    old = per_token_logps.detach() if old is None else old
    adv_row = inp.advantages.to(dtype)  # [B]
    advantages = lay.expand(adv_row)  # [B, 1] (padded) / [N] (packed)

    # ---- vLLM importance-sampling correction (TRL builds it in _generate_and_score_completions) ----
    is_ratio = None
    if inp.sampling_logp is not None:
        samp = clean(tok(inp.sampling_logp))
        diff = torch.nan_to_num((old.detach() - samp) * m, nan=0.0)
        if opts.vllm_is_sequence:
            diff = lay.expand(lay.rowsum(diff))
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
        is_ratio = lay.expand(inp.is_ratio_row.to(dtype))

    # ---- TRL's _compute_loss, line for line (exp arguments clamped) ----
    # At sequence level TRL's coef_1 is [B, 1]; here ``coef_row`` [B] holds it and ``coef_1`` is
    # its broadcast against the tokens, so the metrics can count sequences in both layouts.
    seq = opts.sequence_level
    log_ratio = per_token_logps - old
    if not seq:
        coef_1 = torch.exp(log_ratio.clamp(max=EXP_CLAMP))
        coef_row = None
    else:
        log_importance_weights = lay.rowsum(log_ratio * m) / lay.rowsum(m).clamp(min=1.0)
        coef_row = torch.exp(log_importance_weights.clamp(max=EXP_CLAMP))
        coef_1 = lay.expand(coef_row)
    ratio_for_metric = (coef_row if seq else coef_1).detach()

    if opts.beta != 0.0:
        ref = clean(tok(inp.ref_logp))
        d = ref - per_token_logps
        per_token_kl = torch.exp(d.clamp(max=EXP_CLAMP)) - d - 1
        if opts.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    eps_low, eps_high = opts.eps_low, opts.eps_high

    def clip_flags(c, a):
        """(is_low_clipped, is_high_clipped) of ratio(s) c with advantage(s) a, as TRL logs them."""
        if opts.loss_type == "cispo":
            if opts.cispo_variant == "trl":
                return torch.zeros_like(c, dtype=torch.bool), (c > eps_high) & (a > 0)
            # verl: two-sided, relative bounds, no advantage condition in its clip fraction
            return c < 1 - eps_low, c > 1 + eps_high
        if opts.loss_type == "sapo":
            return torch.zeros_like(c, dtype=torch.bool), torch.zeros_like(c, dtype=torch.bool)
        # TRL measures clipping on coef_1 after the delta cap
        if opts.delta is not None:
            c = torch.clamp(c, max=opts.delta)
        return (c < 1 - eps_low) & (a < 0), (c > 1 + eps_high) & (a > 0)

    if opts.loss_type == "cispo":
        if opts.cispo_variant == "trl":
            clamped_ratios = torch.clamp(coef_1, max=eps_high).detach()
        else:
            clamped_ratios = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif opts.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if opts.delta is not None:
            coef_1 = torch.clamp(coef_1, max=opts.delta)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)

    if is_ratio is not None:
        per_token_loss = per_token_loss * is_ratio
    if opts.beta != 0.0:
        per_token_loss = per_token_loss + opts.beta * per_token_kl

    ga = opts.gradient_accumulation_steps
    lt = opts.loss_type
    if lt in ("grpo", "sapo"):
        loss = (lay.rowsum(per_token_loss * m) / lay.rowsum(m).clamp(min=1.0)).mean() / ga
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
        loss = lay.rowsum(per_token_loss * m).mean() / ga
    else:  # pragma: no cover - options already validated
        raise ValueError(lt)

    # ---- metrics, as TRL's global_masked_mean (one process) ----
    def masked_mean(x, per_sequence):
        # TRL tests x.shape[1] == 1 for "one value per sequence", which also fires for token-level
        # values when T == 1; we go by the importance-sampling level instead
        if per_sequence:  # sequence level: one value per sequence [B], all sequences counted
            return x.sum() / max(x.shape[0], 1)
        return (x * m).sum() / m.sum().clamp(min=1.0)

    with torch.no_grad():
        # ratio_for_metric is coef_1 before the delta cap: [B] at sequence level, else per token
        is_low_clipped, is_high_clipped = clip_flags(ratio_for_metric, adv_row if seq else advantages)
        metrics = {
            "clip_ratio/low_mean": masked_mean(is_low_clipped.to(dtype), seq),
            "clip_ratio/high_mean": masked_mean(is_high_clipped.to(dtype), seq),
            "clip_ratio/region_mean": masked_mean((is_low_clipped | is_high_clipped).to(dtype), seq),
            "ratio_mean": masked_mean(ratio_for_metric, seq),
            "num_tokens": m.sum(),
        }
        if opts.beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl.detach(), False)
    return loss, metrics
