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
``staged.kernels.grpo_loss`` for the list): ratio ``exp`` arguments are clamped at ``EXP_CLAMP``
and the KL's at ``KL_EXP_CLAMP`` (continued by the tangent, with closed-form gradients for the
bias-corrected KL, injected with ``with_grad``) so that extreme log-ratios stay finite, and inputs
at masked positions are zeroed before use so that garbage in padding (NaN, inf) never reaches the
loss or the gradient.
"""
from __future__ import annotations

import math

import torch

from ..grpo_options import check_num_items, resolve_call

# Upper clamp on every exp() argument (log-ratios, ref log-ratios, vLLM log-ratios): verl's
# "safe exp" bound. exp(20) = 4.85e8, so products such as the bias-corrected KL (kl * ratio,
# <= e^40) and sums over a million tokens stay far from fp32's 3.4e38. The kernel reads it from here.
EXP_CLAMP = 20.0
# The k3 KL's exp(ref - logp) is clamped much higher: the KL is TRL's exactly wherever TRL's fp32
# value can be finite in a sum (e^80 = 5.5e34; e^88.7 overflows fp32), and only beyond is its exp
# continued by the tangent line.
KL_EXP_CLAMP = 80.0


def exp_tangent(u, bound=KL_EXP_CLAMP):
    """exp(u) for u <= bound, continued by its tangent line e^Y (1 + u - Y) above: finite,
    increasing, derivative e^min(u, Y). (Both branches are finite, so where()'s unused branch
    never sends inf * 0 = NaN into the gradient.)"""
    return torch.where(u > bound, math.exp(bound) * (1 + (u - bound)), torch.exp(u.clamp(max=bound)))


class _WithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, grad, x):
        ctx.save_for_backward(grad)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError("grpo_loss: double backward (create_graph=True) through the bias-corrected KL "
                               "term is not supported; its gradient is a closed form, not a graph")
        (grad,) = ctx.saved_tensors
        return None, None, g * grad


def with_grad(value, grad, x):
    """``value`` in the forward, ``grad`` (detached) as its derivative with respect to ``x`` in the
    backward: for terms whose closed-form gradient is exact where autograd's product rule is not."""
    return _WithGrad.apply(value.detach(), grad.detach(), x)


@torch.no_grad()
def vespo_gamma_weights(advantages, log_ratio, m, log_is_row, opts, lay):
    """TRL's ``get_gamma_weights`` -> phi [B]: phi(w) = exp(lambda + k log w - lambda w), w the
    sequence's importance weight (sum, not mean, of its clamped token log-ratios, plus its log
    vLLM ratio), in log space, log w clamped to [log 1e-8, 20]; NaN / inf -> 0."""
    lo = math.log(1e-8)
    log_w = lay.rowsum(log_ratio.clamp(-20.0, 20.0) * m)
    if log_is_row is not None:
        log_w = log_w + log_is_row
    log_w = log_w.clamp(lo, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, opts.vespo_k_pos, opts.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, opts.vespo_lambda_pos, opts.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


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
    inside = torch.ones_like(m, dtype=torch.bool) if lay.inside is None else lay.tokens(lay.inside)
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

    log_is_row = None  # VESPO folds the vLLM ratio into its weight, in log space
    if opts.loss_type == "vespo" and (inp.sampling_logp is not None or inp.is_ratio_token is not None):
        # every position of the row counts, masked ones too (TRL / Liger sum the unmasked [B, T]
        # ratio; a built ratio is exp(0) = 1 there)
        raw = is_ratio if inp.sampling_logp is not None else tok(inp.is_ratio_token.to(dtype))
        log_is = torch.log(raw).clamp(math.log(1e-8), 20.0)
        log_is_row = lay.rowsum(torch.where(inside, log_is, torch.zeros((), dtype=dtype, device=dev)))
    elif opts.loss_type == "vespo" and inp.is_ratio_row is not None:
        log_is_row = torch.log(inp.is_ratio_row.to(dtype)).clamp(math.log(1e-8), 20.0)

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
        # past the clamp exp is continued by its tangent: the KL stays finite and increasing, and
        # its gradient 1 - e^min(d, Y) keeps the sign of TRL's 1 - e^d
        per_token_kl = exp_tangent(d) - d - 1
        if opts.use_bias_correction_kl:
            # kl r = e^d r - (d + 1) r with e^d r = e^(ref - old) formed in log space and its
            # exponent capped at KL_EXP_CLAMP: finite where e^d and r, clamped apart, would overflow
            lr = (log_importance_weights if seq else log_ratio).clamp(max=EXP_CLAMP)
            lr = lay.expand(lr) if seq else lr
            with torch.no_grad():
                lyc = d.clamp(max=KL_EXP_CLAMP) + lr
                fc = torch.exp(lyc.clamp(max=KL_EXP_CLAMP)) * (1 + (d - KL_EXP_CLAMP).clamp(min=0))
                klc = torch.where(lyc > KL_EXP_CLAMP, fc - (d + 1) * coef_1, per_token_kl * coef_1)
        if opts.use_bias_correction_kl and seq:
            # d(r sum_s m_s kl_s)/d logp_t = m_t r [S/M - e^d_t + 1 - sum(m)/M - mean(d)] with
            # S = sum m e^d, M = max(sum m, 1) (r's own gradient included, for log_w <= Y): the e^d
            # cancel, so they are formed relative to the row's largest d and only the common factor
            # e^dmax r is capped, keeping the sign (the product rule would not once e^d is clamped)
            with torch.no_grad():
                zero = torch.zeros((), dtype=dtype, device=dev)
                neg_inf = torch.full((), -float("inf"), dtype=dtype, device=dev)
                dv = torch.where(valid, d, neg_inf)
                if lay.packed:
                    dmax = torch.full((B,), -float("inf"), dtype=dtype, device=dev).scatter_reduce(
                        0, lay.seg, torch.where(lay.tokens(lay.inside), dv, neg_inf), "amax")
                else:
                    dmax = dv.amax(-1) if dv.shape[-1] else torch.full((B,), -float("inf"), dtype=dtype)
                dmax = torch.where(torch.isinf(dmax) & (dmax < 0), torch.zeros_like(dmax), dmax)
                msum = lay.rowsum(m)
                mden = msum.clamp(min=1.0)
                rel = torch.exp(torch.minimum(d - lay.expand(dmax), zero))
                se_row = lay.rowsum(torch.where(valid, m * rel, zero)) / mden
                const = 1 - msum / mden - lay.rowsum(m * d) / mden
                sc = torch.exp((lay.expand(dmax.clamp(max=KL_EXP_CLAMP)) + lr).clamp(max=KL_EXP_CLAMP))
                g_rel = sc * (lay.expand(se_row) - rel) + coef_1 * lay.expand(const)
                past = lay.expand(log_importance_weights > EXP_CLAMP)
                g_past = coef_1 - torch.exp((d.clamp(max=KL_EXP_CLAMP) + lr).clamp(max=KL_EXP_CLAMP))
                g = torch.where(past, g_past, g_rel)
            per_token_kl = with_grad(klc, g, per_token_logps)
        elif opts.use_bias_correction_kl:
            # d(kl r)/d logp = (1 - e^d) r + (e^d - d - 1) r = -d r exactly: taken in that form, so a
            # clamped e^d can never leave kl r uncancelled (which flips the gradient's sign)
            per_token_kl = with_grad(klc, -d * coef_1, per_token_logps)

    eps_low, eps_high = opts.eps_low, opts.eps_high

    def clip_flags(c, a):
        """(is_low_clipped, is_high_clipped) of ratio(s) c with advantage(s) a, as TRL logs them."""
        if opts.loss_type == "cispo":
            if opts.cispo_variant == "trl":
                return torch.zeros_like(c, dtype=torch.bool), (c > eps_high) & (a > 0)
            # verl: two-sided, relative bounds, no advantage condition in its clip fraction
            return c < 1 - eps_low, c > 1 + eps_high
        if opts.loss_type in ("sapo", "vespo"):
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
    elif opts.loss_type == "vespo":
        phi = vespo_gamma_weights(adv_row, log_ratio, m, log_is_row, opts, lay)
        phi_seq = lay.expand(phi)
        per_token_loss = -phi_seq * advantages * per_token_logps
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
        if opts.dual_clip is not None:
            # dual clip (verl's compute_policy_loss): for A < 0 the loss is also capped at -A C
            per_token_loss3 = -advantages * opts.dual_clip
            per_token_loss = torch.where(advantages < 0, torch.min(per_token_loss, per_token_loss3),
                                         per_token_loss)

    if is_ratio is not None and opts.loss_type != "vespo":
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
    elif lt in ("cispo", "dapo", "vespo"):
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
        if opts.loss_type == "vespo":  # TRL: one value per sequence, all sequences counted
            metrics["vespo/phi_seq_mean"] = phi.sum() / B
        if opts.dual_clip is not None:
            # verl's pg_clipfrac_lower: the share of tokens (of sequences, at sequence level) whose
            # loss the dual clip replaced by -A C
            c, a = ratio_for_metric, (adv_row if seq else advantages)
            c1 = c if opts.delta is None else c.clamp(max=opts.delta)
            clip_loss = -torch.min(c1 * a, c.clamp(1 - eps_low, 1 + eps_high) * a)
            dual = (clip_loss > -a * opts.dual_clip) & (a < 0)
            metrics["clip_ratio/dual_mean"] = masked_mean(dual.to(dtype), seq)
    return loss, metrics
