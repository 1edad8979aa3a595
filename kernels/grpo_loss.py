"""Fused GRPO loss: Triton forward + backward with TRL's semantics (trl 1.16 ``_compute_loss``).

Shapes and dtypes (N tokens, B sequences):
    logp, old_logp, ref_logp, sampling_logp : [B, T] padded, or any shape with N elements plus
                                              cu_seqlens [B+1] (packed); fp32 (bf16/fp16 accepted,
                                              math is fp32)
    mask                                    : like logp; bool / int / float (float = token weight)
    advantages                              : [B] (or [B, 1]) float, one per sequence
    vllm_is_ratio (precomputed, optional)   : like logp (per token) or [B] (per sequence)
    loss -> 0-d fp32; metrics -> dict of 0-d fp32 device tensors; d loss / d logp -> like logp

Grid: each sequence is split over S programs (S ~ mean row length / BLOCK; on a GPU BLOCK
shrinks from 1024 to 256 until there are >= 4 programs per SM), program (b, sp) taking tiles
sp, sp + S, ... of row b: a 1-D grid of B * S programs (no (B, L) grid to overflow, int64 token
offsets throughout), so 64 x 2048 tokens or one 70k-token sequence fill the device. Launches:
    1. ``_grpo_loss_rows_kernel`` (sequence-level ratio, sequence-level vLLM ratio, VESPO only):
       per-program partial row sums [B*S, 8] (the KL's running max merged as in a softmax).
    2. ``_grpo_loss_fwd_kernel``: each program reduces its row's S partials (same order in every
       program: identical, deterministic), then the per-token loss, its gradient and partial row
       statistics [B*S, 8].
    3. ``_grpo_loss_finish_kernel`` (one program): reduces the partials row by row, applies the
       loss type's normaliser (token counts, ``num_items_in_batch`` read on the device) and writes
       the loss, the metrics and the backward's scale. No torch op follows (packed: one
       ``_assert_async`` on its cu_seqlens flag).
No atomics anywhere: every reduction has a fixed order, so results are bitwise reproducible.
The forward also writes d(m_t * loss_t)/d logp_t (fp32, before the per-sequence normaliser)
because that costs one write where recomputing in the backward would cost re-reading every
input; the backward (one kernel, same grid) is then a scale by the normaliser times the upstream
gradient (both read on the device), plus, for sequence-level ratios, a per-row term times the mask.

Byte model (what the op must move; the benchmark divides it by time for GB/s):
    forward  : N * (4 [logp] + 4 [old] + 4*(beta != 0) [ref] + 4*(vLLM) [sampling or ratio]
               + mask bytes (1 bool / 4 float)) read, + 4N [grad buffer] written when logp
               requires grad; + O(B) (advantages, cu_seqlens) + 32 B per program (partials).
               Launch 1 reads logp, old, mask (+ ref, sampling) once more; launch 2 finds them in
               L2 while the batch's share fits (~50 MB: ~4M tokens on an H100), so it is not
               counted; past that, sequence-level runs re-read them from HBM.
    backward : 4N [grad buffer] (+ mask bytes for sequence-level ratios) read, 4N [d logp] written.
               (Sequence-level without KL/CISPO reads only the mask: its buffer is all zeros and
               is never written.)
Host syncs: none. Options and shapes are read on the host; cu_seqlens' values only on the device
(clamped in the kernels, checked by the finishing kernel, ``torch._assert_async`` on its flag);
the normalisers (token counts, ``num_items_in_batch``) are read by the finishing kernel. A Python
``num_items_in_batch`` is folded into a kernel argument; a tensor on the device is read in place
(any dtype); a CPU tensor on a CUDA run is copied non-blocking from pinned memory (staged into
pinned memory first when pageable), never read on the host.

Semantics: TRL's ``GRPOTrainer._compute_loss`` for every option the two share; see ``grpo_loss``.
Double backward is a RuntimeError (the backward kernel is not differentiable).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .aot import register_aot
from .device import sm_count
from .grpo_options import GRPOLossOptions, check_num_items, resolve_call
from .reference.grpo_loss import EXP_CLAMP, KL_EXP_CLAMP, grpo_loss_reference

# Partial row statistics written by each forward program, [B * S, 8] fp32 (S programs per row).
ROW_LOSS, ROW_COUNT, ROW_CLIP_LOW, ROW_CLIP_HIGH, ROW_KL, ROW_RATIO, ROW_SEQ_GRAD = (
    tl.constexpr(i) for i in range(7))
ROW_STATS = 8  # 8 floats (32 B) per program

# Loss kinds (constexpr): the normaliser is applied on the host, so grpo/bnpo/dr_grpo/dapo/luspo
# share one kernel specialisation.
_CLIPPED, _CISPO_TRL, _CISPO_VERL, _SAPO, _VESPO = 0, 1, 2, 3, 4
ROW_PHI = tl.constexpr(7)  # VESPO's per-sequence gamma weight phi
ROW_DUAL = tl.constexpr(7)  # or, for the clipped losses, the dual-clip count (dual_clip + vespo raises)
# TRL's get_gamma_weights clamps log-weights to [log(1e-8), 20]
_VESPO_LOG_LO = tl.constexpr(math.log(1e-8))
_VESPO_LOG_HI = tl.constexpr(20.0)
# vLLM importance-ratio sources (constexpr).
_IS_NONE, _IS_TOKEN_TENSOR, _IS_ROW_TENSOR, _IS_TOKEN_LOGP, _IS_SEQ_LOGP = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _row_bounds(CU, b, T, N, PACKED: tl.constexpr):
    # int64: B * T and cu_seqlens may exceed 2^31 tokens. Packed bounds are clamped into [0, N]
    # with end >= start, so a bad cu_seqlens never reads or writes out of bounds; the finishing
    # kernel flags it and the launcher asserts on that flag on the device
    if PACKED:
        start = tl.minimum(tl.maximum(tl.load(CU + b).to(tl.int64), 0), N)
        end = tl.minimum(tl.maximum(tl.load(CU + b + 1).to(tl.int64), start), N)
    else:
        start = b * T
        end = start + T
    return start, end


@triton.jit
def _program_row(CU, S, T, N, PACKED: tl.constexpr):
    """(program id, row b, slice sp, the row's first token, its length) of this program: B * S
    programs, program pid = (b, sp) taking tiles sp, sp + S, ... of row b."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    start, end = _row_bounds(CU, b, T, N, PACKED)
    return pid, b, pid - b * S, start, end - start


@triton.jit
def _load_mask(MASK, offs, inb, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        m = tl.load(MASK + offs, mask=inb, other=0).to(tl.float32)
    else:
        m = tl.where(inb, 1.0, 0.0)
    return m


@triton.jit
def _masked_load(P, offs, inb, valid):
    # masked inputs are zeroed at load: padding garbage (NaN, inf) never reaches the math
    return tl.where(valid, tl.load(P + offs, mask=inb, other=0.0).to(tl.float32), 0.0)


# How _load_tokens loads the per-token vLLM ratio (its constexpr LOAD_ISR)
_ISR_OFF, _ISR_MASKED, _ISR_ROW = (tl.constexpr(i) for i in range(3))


@triton.jit
def _load_tokens(LOGP, OLD, REF, SAMP, ISR, MASK, offs, inb,
                 HAS_MASK: tl.constexpr, HAS_OLD: tl.constexpr, LOAD_REF: tl.constexpr,
                 LOAD_SAMP: tl.constexpr, LOAD_ISR: tl.constexpr):
    """One tile of a row's per-token inputs as fp32: (m, valid, lp, old, ref, samp, isr), the
    load every token loop of the rows and forward kernels starts with. m is the mask as a
    weight (0 past the row's end), valid = m != 0; lp, old, ref and samp are zeroed where not
    valid. old = lp when on-policy (not HAS_OLD). isr: _ISR_MASKED zeroed where not valid like
    the others; _ISR_ROW loaded at every position of the row, masked ones included, 1 past its
    end (VESPO sums the log vLLM ratio unmasked). Inputs a flag leaves out come back as zeros
    and are never read (nor loaded)."""
    m = _load_mask(MASK, offs, inb, HAS_MASK)
    valid = m != 0.0
    lp = _masked_load(LOGP, offs, inb, valid)
    if HAS_OLD:
        old = _masked_load(OLD, offs, inb, valid)
    else:
        old = lp  # on-policy: ratio 1, but d ratio / d logp = ratio still flows
    ref = tl.zeros_like(m)
    samp = tl.zeros_like(m)
    isr = tl.zeros_like(m)
    if LOAD_REF:
        ref = _masked_load(REF, offs, inb, valid)
    if LOAD_SAMP:
        samp = _masked_load(SAMP, offs, inb, valid)
    if LOAD_ISR == _ISR_MASKED:
        isr = _masked_load(ISR, offs, inb, valid)
    elif LOAD_ISR == _ISR_ROW:
        isr = tl.load(ISR + offs, mask=inb, other=1.0).to(tl.float32)
    return m, valid, lp, old, ref, samp, isr


@triton.jit
def _vllm_log_ratio(old, samp, m):
    # old - sampling log-probs at valid positions; TRL: nan_to_num (vLLM could not score it)
    d = (old - samp) * m
    return tl.where(d == d, d, 0.0)


@triton.jit
def _cap(x, hi):
    # min(x, hi) that keeps NaN, like torch.clamp (tl.minimum may return the non-NaN operand on
    # a GPU, which would turn a NaN log-prob at a valid position into a finite loss)
    return tl.where(x > hi, hi, x)


@triton.jit
def _clip(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _vllm_ratio(d, is_lo, is_hi, TRUNC: tl.constexpr, EXP_MAX: tl.constexpr):
    # TRL: exp(diff) then clamp (truncate) or zero outside [C_min, C_max] (mask); None bounds
    # arrive as -inf / +inf
    r = tl.exp(_cap(d, EXP_MAX))
    if TRUNC:
        r = _clip(r, is_lo, is_hi)
    else:
        r = tl.where((r < is_lo) | (r > is_hi), 0.0, r)
    return r


@triton.jit
def _exp_tangent(y, ey, EXP_MAX: tl.constexpr):
    # exp continued past the clamp by its tangent line: e^Y (1 + y - Y). Its derivative there is
    # e^Y, so the KL stays increasing in y and its gradient keeps the sign of 1 - e^y
    return ey * (1.0 + tl.where(y > EXP_MAX, y - EXP_MAX, 0.0))


@triton.jit
def _vespo_log_is(isr):
    # TRL: clamp(log(ratio), log(1e-8), 20), NaN kept
    return _clip(tl.log(isr), _VESPO_LOG_LO, _VESPO_LOG_HI)


@triton.jit
def _grpo_loss_rows_kernel(
    # per-token inputs, [N] (a flag off means the pointer is a dummy never read)
    LOGP, OLD, REF, SAMP, ISR, MASK,
    # cu_seqlens [B+1] (PACKED) or a dummy; out: PART1 [B*S, 8] fp32 partial row sums
    CU, PART1,
    # padded row length (unused when PACKED), tokens, programs per sequence
    T, N, S,
    # vLLM ratio bounds (VESPO folds the token ratio into its weight)
    is_lo, is_hi,
    PACKED: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr,
    LOSS_KIND: tl.constexpr, SEQ_LEVEL: tl.constexpr, IS_KIND: tl.constexpr, IS_TRUNC: tl.constexpr,
    USE_KL: tl.constexpr, KL_BIAS: tl.constexpr, EXP_MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 1 (sequence-level ratio, sequence-level vLLM ratio, VESPO weight): program (b, sp)
    sums tiles sp, sp + S, ... of row b. Slots: 0 sum m x, 1 sum m, 2 sum of the vLLM log-ratio,
    3 VESPO sum of clamped m x, 4 VESPO summed log vLLM ratio, 5 max y (y = ref - logp),
    6 sum m e^(y - slot 5), 7 sum m y (5-7: sequence-level bias-corrected KL only)."""
    pid, b, sp, start, n = _program_row(CU, S, T, N, PACKED)
    cols = tl.arange(0, BLOCK)
    acc_x = tl.zeros([BLOCK], tl.float32)
    acc_m = tl.zeros([BLOCK], tl.float32)
    acc_d = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    acc_li = tl.zeros([BLOCK], tl.float32)
    # sequence-level bias-corrected KL: per lane, the running max of y = ref - logp, the sum
    # of m e^(y - max) (online, as a softmax) and the sum of m y
    acc_ymax = tl.full([BLOCK], float("-inf"), tl.float32)
    acc_se = tl.zeros([BLOCK], tl.float32)
    acc_my = tl.zeros([BLOCK], tl.float32)
    for k in range(sp * BLOCK, n, S * BLOCK):
        offs = start + k + cols
        inb = (k + cols) < n
        m, valid, lp, old, ref, samp, isr = _load_tokens(
            LOGP, OLD, REF, SAMP, ISR, MASK, offs, inb, HAS_MASK, HAS_OLD,
            SEQ_LEVEL and USE_KL and KL_BIAS, IS_KIND == 4 or (LOSS_KIND == 4 and IS_KIND == 3),
            _ISR_ROW if (LOSS_KIND == 4 and IS_KIND == 1) else _ISR_OFF)
        if SEQ_LEVEL:
            acc_x += (lp - old) * m
            acc_m += m
            if USE_KL and KL_BIAS:
                yv = ref - lp
                nm = tl.maximum(acc_ymax, tl.where(valid, yv, float("-inf")))
                nm0 = tl.where(nm == float("-inf"), 0.0, nm)
                acc_se = acc_se * tl.exp(acc_ymax - nm0) + tl.where(valid, m * tl.exp(yv - nm0), 0.0)
                acc_ymax = nm
                acc_my += m * yv
        if IS_KIND == 4:
            acc_d += _vllm_log_ratio(old, samp, m)
        if LOSS_KIND == 4:
            # VESPO: the *sum* of the clamped token log-ratios, plus the log vLLM ratio summed
            # over every position of the row, masked ones included (TRL and Liger sum the
            # unmasked [B, T] tensor; there the built ratio is exp(0) = 1)
            acc_v += _clip(lp - old, -20.0, 20.0) * m
            if IS_KIND == 1:
                acc_li += tl.where(inb, _vespo_log_is(isr), 0.0)
            elif IS_KIND == 3:
                r3 = _vllm_ratio(_vllm_log_ratio(old, samp, m), is_lo, is_hi, IS_TRUNC, EXP_MAX)
                acc_li += tl.where(inb, _vespo_log_is(r3), 0.0)
    p = PART1 + pid * 8
    tl.store(p + 0, tl.sum(acc_x, axis=0))
    tl.store(p + 1, tl.sum(acc_m, axis=0))
    tl.store(p + 2, tl.sum(acc_d, axis=0))
    tl.store(p + 3, tl.sum(acc_v, axis=0))
    tl.store(p + 4, tl.sum(acc_li, axis=0))
    ymax = tl.max(acc_ymax, axis=0)
    ymax0 = tl.where(ymax == float("-inf"), 0.0, ymax)
    tl.store(p + 5, ymax)
    tl.store(p + 6, tl.sum(acc_se * tl.exp(acc_ymax - ymax0), axis=0))
    tl.store(p + 7, tl.sum(acc_my, axis=0))


@triton.jit
def _grpo_loss_fwd_kernel(
    # per-token inputs, [N] (a flag off means the pointer is a dummy never read)
    LOGP, OLD, REF, SAMP, ISR, MASK,
    # per-sequence inputs: advantages [B]; cu_seqlens [B+1] (PACKED) or a dummy; PART1 [B*S, 8]
    # pass-1 partial row sums (ROW_PASS) or a dummy
    ADV, CU, PART1,
    # outputs: GRAD [N] fp32 d(m_t*loss_t)/d logp_t (STORE_GRAD); PART2 [B*S, 8] fp32 partial
    # row statistics (ROW_LOSS ... ROW_DUAL)
    GRAD, PART2,
    # padded row length (unused when PACKED), tokens, programs per sequence
    T, N, S,
    # fp32 scalars: clip epsilons, delta (+inf = off), dual-clip C (+inf = off), KL coefficient, SAPO temperatures, vLLM
    # ratio bounds C_min / C_max (-inf / +inf = off), VESPO gamma shapes / rates (A >= 0, A < 0)
    eps_low, eps_high, delta, dual, beta, tau_pos, tau_neg, is_lo, is_hi,
    vk_pos, vl_pos, vk_neg, vl_neg,
    # meta-parameters
    PACKED: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr,
    LOSS_KIND: tl.constexpr, SEQ_LEVEL: tl.constexpr, IS_KIND: tl.constexpr, IS_TRUNC: tl.constexpr,
    USE_KL: tl.constexpr, KL_BIAS: tl.constexpr, STORE_GRAD: tl.constexpr, ROW_PASS: tl.constexpr,
    EXP_MAX: tl.constexpr, KL_MAX: tl.constexpr, BLOCK: tl.constexpr, SB: tl.constexpr,
):
    # program (b, sp) handles tiles sp, sp + S, sp + 2S, ... of sequence b: a long sequence is
    # spread over S programs (S ~ its length / BLOCK), so few long sequences still fill the GPU
    pid, b, sp, start, n = _program_row(CU, S, T, N, PACKED)
    cols = tl.arange(0, BLOCK)
    adv = tl.load(ADV + b).to(tl.float32)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high

    # ---- the row's pass-1 sums: every program of the row reduces the same S partials in the
    # same order (deterministic, identical in all of them; S * 8 floats from L2) ----
    if ROW_PASS:
        srow = tl.arange(0, SB)
        pbase = PART1 + b * S * 8
        r_x = tl.zeros([SB], tl.float32)
        r_m = tl.zeros([SB], tl.float32)
        r_d = tl.zeros([SB], tl.float32)
        r_v = tl.zeros([SB], tl.float32)
        r_my = tl.zeros([SB], tl.float32)
        r_ymax = tl.full([SB], float("-inf"), tl.float32)
        for s0 in range(0, S, SB):
            sm = (s0 + srow) < S
            q = pbase + (s0 + srow) * 8
            r_x += tl.load(q + 0, mask=sm, other=0.0)
            r_m += tl.load(q + 1, mask=sm, other=0.0)
            r_d += tl.load(q + 2, mask=sm, other=0.0)
            r_v += tl.load(q + 3, mask=sm, other=0.0) + tl.load(q + 4, mask=sm, other=0.0)
            if SEQ_LEVEL and USE_KL and KL_BIAS:
                r_ymax = tl.maximum(r_ymax, tl.load(q + 5, mask=sm, other=float("-inf")))
                r_my += tl.load(q + 7, mask=sm, other=0.0)
        if LOSS_KIND == 4:
            lwv = tl.sum(r_v, axis=0)
            if IS_KIND == 2:
                lwv += _vespo_log_is(tl.load(ISR + b).to(tl.float32))
            lwv = _clip(lwv, _VESPO_LOG_LO, _VESPO_LOG_HI)
            kv = tl.where(adv >= 0.0, vk_pos, vk_neg)
            lv = tl.maximum(tl.where(adv >= 0.0, vl_pos, vl_neg), 1e-4)
            phi = tl.exp(lv + kv * lwv - lv * tl.exp(lwv))
            phi = tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)  # TRL: nan_to_num -> 0
        if SEQ_LEVEL:
            # GSPO: mean log-ratio over the sequence's (weighted) tokens, denominator clamped at 1
            msum = tl.sum(r_m, axis=0)
            lw = tl.sum(r_x, axis=0) / tl.maximum(msum, 1.0)
            c_row = tl.exp(_cap(lw, EXP_MAX))
            dc_row = tl.where(lw <= EXP_MAX, c_row, 0.0)  # d ratio / d lw (0 past the clamp)
            if USE_KL and KL_BIAS:
                # d(C sum_s m_s kl_s)/d logp_t = m_t C [S/M - e^(y_t) + 1 - sum(m)/M - mean(y)],
                # S = sum m e^y, M = max(sum m, 1): the e^y terms largely cancel (all equal: exactly),
                # so they are formed relative to the row's largest y and only that common factor
                # e^ymax is clamped: the sign is kept, the magnitude bounded by e^EXP_MAX
                ymax = tl.max(r_ymax, axis=0)
                ymax0 = tl.where(ymax == float("-inf"), 0.0, ymax)
                r_se = tl.zeros([SB], tl.float32)
                for s0 in range(0, S, SB):
                    sm = (s0 + srow) < S
                    q = pbase + (s0 + srow) * 8
                    # a partial's sum is relative to its own max: rescale to the row's
                    r_se += tl.load(q + 6, mask=sm, other=0.0) * tl.exp(
                        tl.load(q + 5, mask=sm, other=float("-inf")) - ymax0)
                mden = tl.maximum(msum, 1.0)
                se_row = tl.sum(r_se, axis=0) / mden
                ymax_c = _cap(ymax0, KL_MAX)
                kl_const = 1.0 - msum / mden - tl.sum(r_my, axis=0) / mden
        if IS_KIND == 4:
            isr_row = _vllm_ratio(tl.sum(r_d, axis=0), is_lo, is_hi, IS_TRUNC, EXP_MAX)
    if IS_KIND == 2:
        isr_row = tl.load(ISR + b).to(tl.float32)

    # ---- pass 2: per-token loss, its gradient, metrics ----
    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_cnt = tl.zeros([BLOCK], tl.float32)
    acc_low = tl.zeros([BLOCK], tl.float32)
    acc_high = tl.zeros([BLOCK], tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    acc_ratio = tl.zeros([BLOCK], tl.float32)
    acc_s = tl.zeros([BLOCK], tl.float32)
    acc_dual = tl.zeros([BLOCK], tl.float32)
    # the advantage as a vector: per-token flags combine it with per-token ratios (and the
    # interpreter cannot `&` a vector with a scalar)
    advv = tl.zeros([BLOCK], tl.float32) + adv
    for k in range(sp * BLOCK, n, S * BLOCK):
        offs = start + k + cols
        inb = (k + cols) < n
        # (VESPO folds the vLLM ratio into phi: no per-token ratio here)
        m, valid, lp, old, ref, samp, isr = _load_tokens(
            LOGP, OLD, REF, SAMP, ISR, MASK, offs, inb, HAS_MASK, HAS_OLD, USE_KL,
            LOSS_KIND != 4 and IS_KIND == 3,
            _ISR_MASKED if (LOSS_KIND != 4 and IS_KIND == 1) else _ISR_OFF)
        if SEQ_LEVEL:
            c = c_row
            dc = dc_row
            lc = _cap(lw, EXP_MAX)  # log of the (clamped) ratio
        else:
            x = lp - old
            lc = _cap(x, EXP_MAX)
            c = tl.exp(lc)
            dc = tl.where(x <= EXP_MAX, c, 0.0)

        if LOSS_KIND == 4 or IS_KIND == 1:
            pass
        elif IS_KIND == 3:
            isr = _vllm_ratio(_vllm_log_ratio(old, samp, m), is_lo, is_hi, IS_TRUNC, EXP_MAX)
        elif IS_KIND != 0:
            isr = isr_row

        # surrogate: pg = policy loss, direct = its d/d logp at fixed ratio, dpg = its d/d ratio
        if LOSS_KIND == 0:
            c2 = _clip(c, lo, hi)
            c1d = _cap(c, delta)
            a1 = c1d * adv
            a2 = c2 * adv
            pg = -tl.where(a1 > a2, a2, a1)  # NaN in either stays NaN (a NaN ratio makes both NaN)
            # torch.min's gradient (ties split it in half) through torch.clamp's (inclusive) bounds,
            # so on-policy steps, where every token ties, match TRL's autograd exactly
            g1 = tl.where(c <= delta, adv, 0.0)
            g2 = tl.where((c >= lo) & (c <= hi), adv, 0.0)
            dpg = -tl.where(a1 < a2, g1, tl.where(a1 > a2, g2, 0.5 * (g1 + g2)))
            # dual clip (verl): for A < 0, min(pg, -A C); constant -A C has no ratio gradient and a
            # tie splits it, as torch.min's does. C = +inf is off (-A C = +inf never wins; A >= 0 is
            # excluded by the flag, so its -0 * inf = NaN is never used)
            p3 = -adv * dual
            pg = pg + tl.zeros([BLOCK], tl.float32)  # a vector at sequence level too (see advv)
            dual_on = (advv < 0.0) & (pg > p3)
            pg = tl.where(dual_on, p3, pg)
            dpg = tl.where(dual_on, 0.0, tl.where((advv < 0.0) & (pg == p3), 0.5 * dpg, dpg))
            direct = 0.0
            if not SEQ_LEVEL:
                is_low = (c1d < lo) & (advv < 0.0)
                is_high = (c1d > hi) & (advv > 0.0)
                acc_dual += tl.where(dual_on, m, 0.0)
        elif LOSS_KIND == 1:
            w = _cap(c, eps_high)  # detached: no gradient through the ratio
            pg = -w * adv * lp
            direct = -w * adv
            dpg = 0.0
            if not SEQ_LEVEL:
                is_low = c < 0.0
                is_high = (c > eps_high) & (advv > 0.0)
        elif LOSS_KIND == 2:
            w = _clip(c, lo, hi)
            pg = -w * adv * lp
            direct = -w * adv
            dpg = 0.0
            if not SEQ_LEVEL:
                is_low = c < lo
                is_high = c > hi
        elif LOSS_KIND == 4:
            # VESPO: phi (detached, per sequence) scales the policy gradient; no clipping
            pg = -phi * adv * lp
            direct = -phi * advv
            dpg = 0.0
            if not SEQ_LEVEL:
                is_low = c < 0.0
                is_high = c < 0.0
        else:
            tau = tl.where(adv > 0.0, tau_pos, tau_neg)
            sg = 1.0 / (1.0 + tl.exp(-tau * (c - 1.0)))  # tau*(c-1) >= -tau: exp cannot overflow
            pg = -sg * 4.0 / tau * adv
            dpg = -4.0 * sg * (1.0 - sg) * adv
            direct = 0.0
            if not SEQ_LEVEL:
                is_low = c < 0.0
                is_high = c < 0.0

        if IS_KIND != 0 and LOSS_KIND != 4:  # VESPO folds the vLLM ratio into phi
            pg = pg * isr
            direct = direct * isr
            dpg = dpg * isr

        if USE_KL:
            y = ref - lp
            ey = tl.exp(_cap(y, KL_MAX))
            kl = _exp_tangent(y, ey, KL_MAX) - y - 1.0
            dkl = 1.0 - ey  # d kl / d logp (past the clamp: 1 - e^Y, the tangent's slope)
            if KL_BIAS:
                # kl c = e^y c - (y + 1) c; e^y c = e^(ref - old) is formed in log space and its
                # exponent capped at KL_MAX too, so that kl c is finite wherever e^y and c are
                # clamped separately (e^80 e^20 would overflow fp32). Below the cap: TRL's product.
                lyc = _cap(y, KL_MAX) + lc
                fc = tl.exp(_cap(lyc, KL_MAX)) * (1.0 + tl.where(y > KL_MAX, y - KL_MAX, 0.0))
                klc = tl.where(lyc > KL_MAX, fc - (y + 1.0) * c, kl * c)
                loss_t = pg + beta * klc
                dlc = dpg
                if SEQ_LEVEL:
                    # e^ymax C, capped like e^y c above; past the ratio clamp (C constant) the
                    # gradient is m_t C (1 - e^y_t), with e^y_t C capped the same way
                    sc = tl.exp(_cap(ymax_c + lc, KL_MAX))
                    gkl = tl.where(lw <= EXP_MAX,
                                   sc * (se_row - tl.exp(tl.minimum(y - ymax0, 0.0))) + c * kl_const,
                                   c - tl.exp(_cap(_cap(y, KL_MAX) + lc, KL_MAX)))
                    direct = direct + beta * gkl
                else:
                    # d(kl c)/d logp = (1 - e^y) c + (e^y - y - 1) c = -y c: the e^y terms cancel,
                    # so the gradient is taken in that form (exact for any y, no clamp enters).
                    # The product rule with a clamped e^y keeps kl c without the -e^y c that
                    # cancels it, which flips the sign.
                    direct = direct - beta * y * c
                kl = klc
            else:
                loss_t = pg + beta * kl
                direct = direct + beta * dkl
                dlc = dpg
            acc_kl += kl * m
        else:
            loss_t = pg
            dlc = dpg

        acc_loss += loss_t * m
        acc_cnt += m
        if not SEQ_LEVEL:
            acc_low += tl.where(is_low, m, 0.0)
            acc_high += tl.where(is_high, m, 0.0)
            acc_ratio += c * m
        if STORE_GRAD:
            if SEQ_LEVEL:
                # the ratio term is shared by the row: sum it here, spread it in the backward
                acc_s += dlc * m
                if LOSS_KIND == 1 or LOSS_KIND == 2 or LOSS_KIND == 4 or USE_KL:
                    tl.store(GRAD + offs, direct * m, mask=inb)
            else:
                tl.store(GRAD + offs, (direct + dlc * dc) * m, mask=inb)

    # ---- this program's partial row statistics, PART2[b * S + sp] (the finishing kernel and the
    # backward reduce them in a fixed order: deterministic, no atomics) ----
    cnt = tl.sum(acc_cnt, axis=0)
    rp = PART2 + pid * 8
    first = sp == 0  # per-row values (flags, ratio, phi) come from the row's first program only
    tl.store(rp + ROW_LOSS, tl.sum(acc_loss, axis=0))
    tl.store(rp + ROW_COUNT, cnt)
    tl.store(rp + ROW_KL, tl.sum(acc_kl, axis=0))
    if SEQ_LEVEL:
        # sequence level: clip flags and ratio are one value per sequence (TRL's [B, 1] metrics)
        if LOSS_KIND == 0:
            c1r = _cap(c_row, delta)
            low_r = (c1r < lo) & (adv < 0.0)
            high_r = (c1r > hi) & (adv > 0.0)
            b1 = c1r * adv
            b2 = _clip(c_row, lo, hi) * adv
            dual_r = tl.where(adv < 0.0, tl.where(-tl.where(b1 > b2, b2, b1) > -adv * dual, 1.0, 0.0), 0.0)
        elif LOSS_KIND == 1:
            low_r = c_row < 0.0
            high_r = (c_row > eps_high) & (adv > 0.0)
        elif LOSS_KIND == 2:
            low_r = c_row < lo
            high_r = c_row > hi
        else:
            low_r = c_row < 0.0
            high_r = c_row < 0.0
        tl.store(rp + ROW_CLIP_LOW, tl.where(first, tl.where(low_r, 1.0, 0.0), 0.0))
        tl.store(rp + ROW_CLIP_HIGH, tl.where(first, tl.where(high_r, 1.0, 0.0), 0.0))
        tl.store(rp + ROW_RATIO, tl.where(first, c_row, 0.0))
        # d lw / d logp_t = m_t / max(sum m, 1): the backward adds m_t * (the row's sum of this
        # slot) / max(sum m, 1) to each token
        tl.store(rp + ROW_SEQ_GRAD, dc_row * tl.sum(acc_s, axis=0))
    else:
        tl.store(rp + ROW_CLIP_LOW, tl.sum(acc_low, axis=0))
        tl.store(rp + ROW_CLIP_HIGH, tl.sum(acc_high, axis=0))
        tl.store(rp + ROW_RATIO, tl.sum(acc_ratio, axis=0))
        tl.store(rp + ROW_SEQ_GRAD, 0.0)
    # slot 7: VESPO's phi, or the dual-clip count (dual_clip is an error with vespo)
    if LOSS_KIND == 4:
        tl.store(rp + ROW_PHI, tl.where(first, phi, 0.0))
    elif LOSS_KIND == 0:
        if SEQ_LEVEL:
            tl.store(rp + ROW_DUAL, tl.where(first, dual_r, 0.0))
        else:
            tl.store(rp + ROW_DUAL, tl.sum(acc_dual, axis=0))
    else:
        tl.store(rp + ROW_DUAL, 0.0)


@triton.jit
def _grpo_loss_finish_kernel(
    PART2,             # [B*S, 8] fp32 partial row statistics from the forward
    NI, CU,            # num_items_in_batch (1 element, any dtype; DEN_KIND 2) or dummy; cu_seqlens or dummy
    LOSS, MET, WB,     # out: [] fp32 loss; [9] fp32 metrics (+ cu_seqlens ok flag); [1] fp32 normaliser
    B, S, N,
    wc,                # fp32 host constant of the normaliser (see _normaliser)
    PACKED: tl.constexpr, PER_ROW: tl.constexpr, DEN_KIND: tl.constexpr, SEQ_LEVEL: tl.constexpr,
    RB: tl.constexpr,
):
    """One program: reduces PART2 row by row in a fixed order, applies the loss type's normaliser
    and writes the loss, the metrics and the backward's scale: the whole tail of the forward in
    one launch. Normaliser: PER_ROW (grpo, sapo): loss = wc * sum_b loss_b / max(cnt_b, 1);
    otherwise loss = W0 * sum_b loss_b with W0 = wc (DEN_KIND 0), wc / max(sum cnt, 1) (1), or
    wc / max(*NI, 1) (2: num_items_in_batch read on the device)."""
    # (1-D only: triton 3.6 -- the GPU image's -- crashes in OptimizeThreadLocality on a 2-D tile
    # reduced along one axis inside this loop)
    rows = tl.arange(0, RB)
    t_loss = tl.zeros([RB], tl.float32)
    t_lpr = tl.zeros([RB], tl.float32)
    t_cnt = tl.zeros([RB], tl.float32)
    t_low = tl.zeros([RB], tl.float32)
    t_high = tl.zeros([RB], tl.float32)
    t_kl = tl.zeros([RB], tl.float32)
    t_ratio = tl.zeros([RB], tl.float32)
    t_7 = tl.zeros([RB], tl.float32)
    bad = tl.zeros([RB], tl.int32)
    for b0 in range(0, B, RB):
        rb = (b0 + rows).to(tl.int64)
        rmask = rb < B
        r_loss = tl.zeros([RB], tl.float32)
        r_cnt = tl.zeros([RB], tl.float32)
        for sc in range(0, S):
            q = PART2 + (rb * S + sc) * 8
            r_loss += tl.load(q + ROW_LOSS, mask=rmask, other=0.0)
            r_cnt += tl.load(q + ROW_COUNT, mask=rmask, other=0.0)
            t_low += tl.load(q + ROW_CLIP_LOW, mask=rmask, other=0.0)
            t_high += tl.load(q + ROW_CLIP_HIGH, mask=rmask, other=0.0)
            t_kl += tl.load(q + ROW_KL, mask=rmask, other=0.0)
            t_ratio += tl.load(q + ROW_RATIO, mask=rmask, other=0.0)
            t_7 += tl.load(q + ROW_DUAL, mask=rmask, other=0.0)
        t_loss += r_loss
        t_cnt += r_cnt
        if PER_ROW:
            t_lpr += r_loss / tl.maximum(r_cnt, 1.0)
        if PACKED:
            # rows ordered and inside the token buffer (the kernels clamped them; this reports it)
            c0 = tl.load(CU + rb, mask=rmask, other=0).to(tl.int64)
            c1 = tl.load(CU + rb + 1, mask=rmask, other=0).to(tl.int64)
            bad += tl.where(rmask & ((c1 < c0) | (c0 < 0) | (c1 > N)), 1, 0)
    tok = tl.sum(t_cnt, axis=0)
    tden = tl.maximum(tok, 1.0)
    nseq = B * 1.0
    if SEQ_LEVEL:
        mden = nseq  # TRL: sequence-level metrics count sequences
    else:
        mden = tden
    if PER_ROW:
        w0 = wc
        loss = tl.sum(t_lpr, axis=0) * wc
    else:
        if DEN_KIND == 0:
            w0 = wc
        elif DEN_KIND == 1:
            w0 = wc / tden
        else:
            w0 = wc / tl.maximum(tl.load(NI).to(tl.float32), 1.0)
        loss = tl.sum(t_loss, axis=0) * w0
    tl.store(LOSS, loss)
    tl.store(WB, w0)
    low = tl.sum(t_low, axis=0) / mden
    high = tl.sum(t_high, axis=0) / mden
    tl.store(MET + 0, low)
    tl.store(MET + 1, high)
    tl.store(MET + 2, low + high)
    tl.store(MET + 3, tl.sum(t_kl, axis=0) / tden)
    tl.store(MET + 4, tl.sum(t_ratio, axis=0) / mden)
    tl.store(MET + 5, tok)
    tl.store(MET + 6, tl.sum(t_7, axis=0) / nseq)  # vespo: mean phi over sequences
    tl.store(MET + 7, tl.sum(t_7, axis=0) / mden)  # clipped: dual-clip fraction
    tl.store(MET + 8, tl.where(tl.sum(bad, axis=0) == 0, 1.0, 0.0))


@triton.jit
def _grpo_loss_bwd_kernel(
    GRAD, MASK,        # [N] fp32 forward gradient buffer (read when HAS_DIRECT); [N] mask
    PART2, WB, DLOSS,  # [B*S, 8] partial row stats; [1] fp32 normaliser; [] upstream gradient
    CU, DLOGP,         # [B+1] cu_seqlens (PACKED) or dummy; [N] output, logp's dtype
    T, N, S,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DIRECT: tl.constexpr,
    SEQ_LEVEL: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr, SB: tl.constexpr,
):
    pid, b, sp, start, n = _program_row(CU, S, T, N, PACKED)
    cols = tl.arange(0, BLOCK)
    w = tl.load(WB) * tl.load(DLOSS).to(tl.float32)
    if PER_ROW or SEQ_LEVEL:
        # the row's token count and sequence-level gradient sum, reduced as the forward did
        srow = tl.arange(0, SB)
        r_cnt = tl.zeros([SB], tl.float32)
        r_sg = tl.zeros([SB], tl.float32)
        for s0 in range(0, S, SB):
            sm = (s0 + srow) < S
            q = PART2 + (b * S + s0 + srow) * 8
            r_cnt += tl.load(q + ROW_COUNT, mask=sm, other=0.0)
            if SEQ_LEVEL:
                r_sg += tl.load(q + ROW_SEQ_GRAD, mask=sm, other=0.0)
        cden = tl.maximum(tl.sum(r_cnt, axis=0), 1.0)
        if PER_ROW:
            w = w / cden
        if SEQ_LEVEL:
            r = tl.sum(r_sg, axis=0) / cden
    for k in range(sp * BLOCK, n, S * BLOCK):
        offs = start + k + cols
        inb = (k + cols) < n
        if HAS_DIRECT:
            g = tl.load(GRAD + offs, mask=inb, other=0.0)
        else:
            g = tl.zeros([BLOCK], tl.float32)
        if SEQ_LEVEL:
            m = _load_mask(MASK, offs, inb, HAS_MASK)
            g += m * r
        tl.store(DLOGP + offs, (g * w).to(DLOGP.dtype.element_ty), mask=inb)


# Representative launches for ahead-of-time compilation (python -m staged.kernels.aot): the
# heaviest specialisations (every input read, KL with bias correction, vLLM correction), at the
# largest tile the launcher picks (1024; on a GPU it splits to 256-1024).
_ROWS_SIG = {
    "LOGP": "*fp32", "OLD": "*fp32", "REF": "*fp32", "SAMP": "*fp32", "ISR": "*fp32", "MASK": "*u8",
    "CU": "*i32", "PART1": "*fp32", "T": "i64", "N": "i64", "S": "i32", "is_lo": "fp32", "is_hi": "fp32",
}
_ROWS_META = dict(PACKED=True, HAS_OLD=True, HAS_MASK=True, LOSS_KIND=_CLIPPED, SEQ_LEVEL=True,
                  IS_KIND=_IS_SEQ_LOGP, IS_TRUNC=False, USE_KL=True, KL_BIAS=True, EXP_MAX=EXP_CLAMP,
                  BLOCK=1024)
register_aot(_grpo_loss_rows_kernel, _ROWS_SIG, _ROWS_META, num_warps=8)
register_aot(_grpo_loss_rows_kernel, _ROWS_SIG,
             {**_ROWS_META, "PACKED": False, "LOSS_KIND": _VESPO, "SEQ_LEVEL": False,
              "IS_KIND": _IS_TOKEN_LOGP, "IS_TRUNC": True},
             num_warps=8, name="_grpo_loss_rows_kernel[vespo]")
_FWD_SIG = {
    "LOGP": "*fp32", "OLD": "*fp32", "REF": "*fp32", "SAMP": "*fp32", "ISR": "*fp32", "MASK": "*u8",
    "ADV": "*fp32", "CU": "*i32", "PART1": "*fp32", "GRAD": "*fp32", "PART2": "*fp32",
    "T": "i64", "N": "i64", "S": "i32",
    "eps_low": "fp32", "eps_high": "fp32", "delta": "fp32", "dual": "fp32", "beta": "fp32", "tau_pos": "fp32",
    "tau_neg": "fp32", "is_lo": "fp32", "is_hi": "fp32",
    "vk_pos": "fp32", "vl_pos": "fp32", "vk_neg": "fp32", "vl_neg": "fp32",
}
_FWD_META = dict(PACKED=False, HAS_OLD=True, HAS_MASK=True, LOSS_KIND=_CLIPPED, SEQ_LEVEL=False,
                 IS_KIND=_IS_TOKEN_LOGP, IS_TRUNC=True, USE_KL=True, KL_BIAS=True, STORE_GRAD=True,
                 ROW_PASS=False, EXP_MAX=EXP_CLAMP, KL_MAX=KL_EXP_CLAMP, BLOCK=1024, SB=64)
register_aot(_grpo_loss_fwd_kernel, _FWD_SIG, _FWD_META, num_warps=8)
register_aot(_grpo_loss_fwd_kernel, _FWD_SIG,
             {**_FWD_META, "PACKED": True, "SEQ_LEVEL": True, "IS_KIND": _IS_SEQ_LOGP, "IS_TRUNC": False,
              "ROW_PASS": True},
             num_warps=8, name="_grpo_loss_fwd_kernel[sequence,packed]")
register_aot(_grpo_loss_fwd_kernel, _FWD_SIG,
             {**_FWD_META, "LOSS_KIND": _SAPO, "IS_KIND": _IS_TOKEN_TENSOR},
             num_warps=8, name="_grpo_loss_fwd_kernel[sapo]")
register_aot(_grpo_loss_fwd_kernel, _FWD_SIG,
             {**_FWD_META, "LOSS_KIND": _CISPO_TRL, "PACKED": True},
             num_warps=8, name="_grpo_loss_fwd_kernel[cispo,packed]")
register_aot(_grpo_loss_fwd_kernel, _FWD_SIG,
             {**_FWD_META, "LOSS_KIND": _VESPO, "IS_KIND": _IS_TOKEN_TENSOR, "ROW_PASS": True},
             num_warps=8, name="_grpo_loss_fwd_kernel[vespo]")
register_aot(_grpo_loss_fwd_kernel, _FWD_SIG, {**_FWD_META, "BLOCK": 256}, num_warps=2,
             name="_grpo_loss_fwd_kernel[block256]")
_FIN_SIG = {"PART2": "*fp32", "NI": "*i64", "CU": "*i32", "LOSS": "*fp32", "MET": "*fp32", "WB": "*fp32",
            "B": "i32", "S": "i32", "N": "i64", "wc": "fp32"}
register_aot(_grpo_loss_finish_kernel, _FIN_SIG,
             dict(PACKED=True, PER_ROW=True, DEN_KIND=2, SEQ_LEVEL=True, RB=64), num_warps=4)
register_aot(_grpo_loss_finish_kernel, _FIN_SIG,
             dict(PACKED=False, PER_ROW=False, DEN_KIND=1, SEQ_LEVEL=False, RB=1024), num_warps=4,
             name="_grpo_loss_finish_kernel[RB=1024]")
_BWD_SIG = {"GRAD": "*fp32", "MASK": "*u8", "PART2": "*fp32", "WB": "*fp32", "DLOSS": "*fp32",
            "CU": "*i32", "DLOGP": "*fp32", "T": "i64", "N": "i64", "S": "i32"}
register_aot(_grpo_loss_bwd_kernel, _BWD_SIG,
             dict(PACKED=True, HAS_MASK=True, HAS_DIRECT=True, SEQ_LEVEL=True, PER_ROW=True, BLOCK=1024,
                  SB=64), num_warps=8)
register_aot(_grpo_loss_bwd_kernel, {**_BWD_SIG, "DLOGP": "*bf16"},
             dict(PACKED=False, HAS_MASK=True, HAS_DIRECT=True, SEQ_LEVEL=False, PER_ROW=False, BLOCK=256,
                  SB=64), num_warps=2, name="_grpo_loss_bwd_kernel[bf16,block256]")


# ---------------------------------------------------------------------------------------------
# Host side

_S_MAX = 4096  # programs per sequence at most (a longer row loops over more tiles per program)


def _launch_config(inp, block_size, device=None):
    """(BLOCK, S, num_warps): tokens per tile, programs per sequence, warps per program.

    The grid is B * S programs, program (b, sp) taking tiles sp, sp + S, ... of sequence b, with
    S = ceil(mean row length / BLOCK) (the padded length, or N / B packed: longer packed rows
    loop). On a GPU the default tile shrinks (1024 -> 256) until the grid has >= 4 programs per
    SM, so that 64 x 2048 tokens or one 70k-token sequence still fill the device."""
    L = max(inp.T if not inp.packed else -(-inp.N // inp.B), 1)
    if block_size is None:
        block_size = min(max(triton.next_power_of_2(L), 16), 1024)
        if device is not None and device.type == "cuda":
            target = 4 * sm_count(device)
            while block_size > 256 and inp.B * -(-L // block_size) < target:
                block_size //= 2
    elif block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"grpo_loss: block_size={block_size} must be a power of two >= 16")
    S = max(1, min(-(-L // block_size), _S_MAX))
    # 4 fp32 per thread and array: the forward keeps ~7 accumulators live plus the loads
    num_warps = max(1, min(8, block_size // 128))
    return block_size, S, num_warps


def _mask_arg(mask):
    # Triton has no bool pointer loads on every version: view bool as uint8 (zero-copy)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _num_items_on(num_items, dev: torch.device):
    """``num_items_in_batch`` as the finishing kernel reads it, with no host sync: a tensor on the
    loss's device is read in place (any dtype); a pinned CPU tensor is copied non-blocking (in
    stream order, so a value still being written by an earlier async copy is read correctly); a
    pageable CPU tensor is first staged into pinned memory (PyTorch's caching host allocator: no
    device sync; a plain pageable copy would make the host wait for the device)."""
    if num_items.device == dev:
        return num_items
    if num_items.device.type == "cpu" and dev.type == "cuda":
        src = num_items if num_items.is_pinned() else num_items.pin_memory()
        return src.to(dev, non_blocking=True)
    return num_items.to(dev, non_blocking=True)


def _normaliser(opts: GRPOLossOptions, B: int, num_items, dev):
    """TRL's normaliser for each loss type as the finishing kernel's (PER_ROW, DEN_KIND, wc, NI):
    d loss / d (sum_t m_t loss_t) of row b is wc / max(cnt_b, 1) when PER_ROW, else W0 with
    W0 = wc (DEN_KIND 0), wc / max(sum cnt, 1) (1) or wc / max(num_items, 1) (2, NI read on the
    device). Only Python numbers are combined on the host."""
    ga = opts.gradient_accumulation_steps
    lt = opts.loss_type
    if lt in ("grpo", "sapo"):  # mean over each sequence's tokens, then over sequences
        return True, 0, 1.0 / (B * ga), None
    if lt == "bnpo":  # local token count
        return False, 1, 1.0 / ga, None
    if lt == "dr_grpo":  # constant B * max_completion_length
        return False, 0, 1.0 / (B * opts.max_completion_length * ga), None
    if lt in ("dapo", "cispo", "vespo"):  # global token count of the generation batch, per process
        scale = ga / (opts.num_processes * opts.steps_per_generation)
        if num_items is None:
            return False, 1, 1.0 / scale, None
        if not isinstance(num_items, torch.Tensor):  # a Python number: folded into the constant
            return False, 0, 1.0 / (max(float(num_items), 1.0) * scale), None
        return False, 2, 1.0 / scale, _num_items_on(num_items, dev)
    if lt == "luspo":  # sum over each sequence, mean over sequences
        return False, 0, 1.0 / (B * ga), None
    raise AssertionError(lt)


_METRIC_NAMES = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl",
                 "ratio_mean", "num_tokens", "vespo/phi_seq_mean", "clip_ratio/dual_mean")
_MET_OK = 8  # the finishing kernel's cu_seqlens check


class GRPOLossFunction(torch.autograd.Function):
    """loss, metrics = GRPOLossFunction.apply(logp_flat, inputs, opts, num_items, block, S, warps).

    Only ``logp`` gets a gradient: old/ref/sampling log-probs and advantages are constants, as
    in TRL (computed under no_grad there).

    Launches: forward = [pass-1 row sums] + per-token kernel + finishing kernel (+ one
    ``_assert_async`` on its cu_seqlens flag, packed only); backward = one kernel (+ a memset of
    the gradient, packed only: tokens outside every sequence get zeros). No host sync, no
    trailing torch ops: loss, metrics and the normaliser are written by the finishing kernel."""

    @staticmethod
    def forward(ctx, logp, inp, opts: GRPOLossOptions, num_items, block, S, num_warps):
        dev = logp.device
        B, N = inp.B, inp.N
        store_grad = bool(ctx.needs_input_grad[0])
        loss_kind = {"cispo": _CISPO_TRL if opts.cispo_variant == "trl" else _CISPO_VERL,
                     "sapo": _SAPO, "vespo": _VESPO}.get(opts.loss_type, _CLIPPED)
        if inp.sampling_logp is not None:
            is_kind = _IS_SEQ_LOGP if opts.vllm_is_sequence else _IS_TOKEN_LOGP
        elif inp.is_ratio_token is not None:
            is_kind = _IS_TOKEN_TENSOR
        elif inp.is_ratio_row is not None:
            is_kind = _IS_ROW_TENSOR
        else:
            is_kind = _IS_NONE
        seq = opts.sequence_level
        use_kl = opts.beta != 0.0
        has_direct = (not seq) or use_kl or loss_kind in (_CISPO_TRL, _CISPO_VERL, _VESPO)
        row_pass = seq or is_kind == _IS_SEQ_LOGP or loss_kind == _VESPO
        lo = opts.vllm_importance_sampling_clip_min
        hi = opts.vllm_importance_sampling_clip_max
        is_lo = -float("inf") if lo is None else float(lo)
        is_hi = float("inf") if hi is None else float(hi)
        per_row, den_kind, wc, ni = _normaliser(opts, B, num_items, dev)
        P = B * S
        sb = min(triton.next_power_of_2(S), 64)

        # at least one element: Triton wants a real pointer even when nothing is read or written
        grad_buf = torch.empty(max(N, 1) if (store_grad and has_direct) else 1, dtype=torch.float32, device=dev)
        part2 = torch.empty(P * ROW_STATS, dtype=torch.float32, device=dev)
        part1 = torch.empty(P * ROW_STATS if row_pass else 1, dtype=torch.float32, device=dev)
        loss = torch.empty((), dtype=torch.float32, device=dev)
        mvec = torch.empty(9, dtype=torch.float32, device=dev)
        wbuf = torch.empty(1, dtype=torch.float32, device=dev)
        mask = _mask_arg(inp.mask) if inp.mask is not None else logp
        isr = inp.is_ratio_token if inp.is_ratio_token is not None else inp.is_ratio_row
        cu = inp.cu_seqlens if inp.packed else inp.advantages
        old = inp.old_logp if inp.old_logp is not None else logp
        ref = inp.ref_logp if use_kl else logp
        samp = inp.sampling_logp if inp.sampling_logp is not None else logp
        isr = isr if isr is not None else logp
        common = dict(PACKED=inp.packed, HAS_OLD=inp.old_logp is not None, HAS_MASK=inp.mask is not None,
                      LOSS_KIND=loss_kind, SEQ_LEVEL=seq, IS_KIND=is_kind, IS_TRUNC=opts.vllm_is_truncate,
                      USE_KL=use_kl, KL_BIAS=bool(opts.use_bias_correction_kl), EXP_MAX=EXP_CLAMP,
                      BLOCK=block, num_warps=num_warps)
        if row_pass:
            _grpo_loss_rows_kernel[(P,)](logp, old, ref, samp, isr, mask, cu, part1, inp.T, N, S,
                                         is_lo, is_hi, **common)
        _grpo_loss_fwd_kernel[(P,)](
            logp, old, ref, samp, isr, mask,
            inp.advantages, cu, part1,
            grad_buf, part2,
            inp.T, N, S,
            float(opts.eps_low), float(opts.eps_high),
            float("inf") if opts.delta is None else float(opts.delta),
            float("inf") if opts.dual_clip is None else float(opts.dual_clip),
            float(opts.beta), float(opts.sapo_temperature_pos), float(opts.sapo_temperature_neg),
            is_lo, is_hi,
            float(opts.vespo_k_pos), float(opts.vespo_lambda_pos), float(opts.vespo_k_neg),
            float(opts.vespo_lambda_neg),
            STORE_GRAD=store_grad, ROW_PASS=row_pass, KL_MAX=KL_EXP_CLAMP, SB=sb, **common,
        )
        _grpo_loss_finish_kernel[(1,)](
            part2, ni if ni is not None else cu, cu, loss, mvec, wbuf, B, S, N, wc,
            PACKED=inp.packed, PER_ROW=per_row, DEN_KIND=den_kind, SEQ_LEVEL=seq,
            RB=min(triton.next_power_of_2(B), 1024), num_warps=4,
        )
        if inp.packed:
            # device-side check (no host sync): rows ordered and inside the token buffer
            torch._assert_async(mvec[_MET_OK], "grpo_loss: cu_seqlens must be non-decreasing, within [0, N]")
        metrics = mvec  # [_METRIC_NAMES..., cu_seqlens ok]

        ctx.mark_non_differentiable(metrics)
        ctx.save_for_backward(grad_buf, part2, wbuf, inp.mask if inp.mask is not None else grad_buf,
                              inp.cu_seqlens if inp.packed else wbuf)
        ctx.meta = (inp.packed, inp.mask is not None, has_direct, seq, per_row, inp.T, N, S, sb, block,
                    num_warps, logp.dtype)
        return loss, metrics

    @staticmethod
    def backward(ctx, dloss, dmetrics):
        if torch.is_grad_enabled():
            # (once_differentiable would hand back a gradient without a graph, and the second
            # derivative would then fail far from here or silently count as zero)
            raise RuntimeError("grpo_loss: double backward (create_graph=True) is not supported: the "
                               "backward kernel is not itself differentiable")
        grad_buf, part2, wbuf, mask, cu = ctx.saved_tensors
        packed, has_mask, has_direct, seq, per_row, T, N, S, sb, block, num_warps, dtype = ctx.meta
        B = part2.numel() // (ROW_STATS * S)
        # rows outside every sequence (packed buffer padding) get no gradient: zeros, not empty
        dlogp = (torch.zeros if packed else torch.empty)(max(N, 1), dtype=dtype, device=part2.device)
        _grpo_loss_bwd_kernel[(B * S,)](
            grad_buf, _mask_arg(mask) if has_mask else grad_buf, part2, wbuf, dloss, cu, dlogp, T, N, S,
            PACKED=packed, HAS_MASK=has_mask, HAS_DIRECT=has_direct, SEQ_LEVEL=seq, PER_ROW=per_row,
            BLOCK=block, SB=sb, num_warps=num_warps,
        )
        return dlogp[:N], None, None, None, None, None, None


def _resolve_backend(backend, device: torch.device) -> str:
    """'auto' -> Triton on CUDA, and on CPU under TRITON_INTERPRET=1 (the tests); plain torch on a
    CPU without the interpreter (compiled Triton needs a GPU)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"grpo_loss: backend must be 'auto', 'triton' or 'torch'; got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" or interpret) else "torch"
    if backend == "triton" and device.type != "cuda" and not interpret:
        raise ValueError(f"grpo_loss: backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
                         "set before triton is imported (or use backend='torch')")
    return backend


def _torch_compute_dtype(logp) -> torch.dtype:
    # the torch path computes in the inputs' precision; half inputs are upcast to fp32, as the
    # kernel does (a bf16 exp / sum over a sequence would lose the loss)
    return torch.float64 if getattr(logp, "dtype", None) == torch.float64 else torch.float32


def grpo_loss(logp, old_logp=None, ref_logp=None, advantages=None, mask=None, *,
              cu_seqlens=None, sampling_logp=None, vllm_is_ratio=None, num_items_in_batch=None,
              block_size=None, backend="auto", **options):
    """Fused GRPO policy loss with TRL's semantics. Returns ``(loss, metrics)``.

    ``backend``: ``"auto"`` — the Triton kernels on CUDA, and on CPU under ``TRITON_INTERPRET=1``
    (how the tests run them); on a CPU without the interpreter the plain-PyTorch path.
    ``"triton"`` — the kernels (on CPU only under the interpreter). ``"torch"`` — the plain-PyTorch
    path on any device: ``staged.kernels.reference.grpo_loss`` run in the inputs' precision (fp64
    for fp64 ``logp``, else fp32; the loss and metrics come back in that dtype), both layouts, no
    host sync (the packed layout's sequence of each token is found on the device). Same semantics,
    same validation and errors; it materialises a few [N] temporaries and autograd keeps them.

    Layouts: padded ``logp [B, T]`` (``mask [B, T]``), or packed ``logp`` of any shape with N
    elements plus ``cu_seqlens [B+1]`` (sequence b owns flat tokens ``cu[b]:cu[b+1]``; tokens
    outside every sequence are ignored and get zero gradient). ``advantages`` are per sequence,
    ``[B]``. ``old_logp=None`` means on-policy (``old = logp.detach()``, TRL's shortcut).
    Only ``logp`` receives a gradient.

    Options (keyword; TRL's defaults; see ``GRPOLossOptions`` for each field):
    ``loss_type`` (dapo), ``importance_sampling_level`` (token), ``eps_low`` (0.2), ``eps_high``
    (None = eps_low), ``delta`` (None), ``dual_clip`` (None; verl's dual-clip C > 1, clipped
    loss types only), ``beta`` (0.0; at 0 no ref work and ``ref_logp`` may be
    None), ``use_bias_correction_kl`` (True), ``cispo_variant`` (trl), ``sapo_temperature_pos``/
    ``_neg`` (1.0/1.05), ``vllm_importance_sampling_mode`` (sequence_mask),
    ``vllm_importance_sampling_clip_min``/``_max`` (None/3.0), ``max_completion_length``
    (dr_grpo), ``num_processes``, ``gradient_accumulation_steps``, ``steps_per_generation``.
    Aliases: ``epsilon``/``epsilon_low`` -> eps_low, ``epsilon_high`` -> eps_high,
    ``completion_mask``/``attention_mask`` -> mask, ``old_per_token_logps``, ``ref_per_token_logps``,
    ``sampling_per_token_logps`` -> sampling_logp, ``importance_sampling_ratio`` -> vllm_is_ratio.
    ``block_size`` (power of two) overrides the token chunk per program; the default is sized to
    the mean row length, at most 1024 (much larger blocks spill registers on a GPU).

    vLLM correction: pass ``sampling_logp`` (the rollout engine's log-probs) and the ratio
    ``exp(old - sampling)`` is built in the kernel exactly as TRL builds it (NaN -> ratio 1, token
    or sequence granularity, truncate or mask to [C_min, C_max]); or pass a precomputed
    ``vllm_is_ratio`` (Liger's argument; per token like logp, or per sequence [B]).

    Per token (ratio r = exp(logp - old), or GSPO's per-sequence exp(masked mean log-ratio)):
        clipped (grpo, bnpo, dr_grpo, dapo, luspo): -min(min(r, delta) A, clip(r, 1-eps_low, 1+eps_high) A),
                       with ``dual_clip=C`` and A < 0 further min'd with -A C (verl's compute_policy_loss)
        cispo  (TRL):  -sg(min(r, eps_high)) A logp      (verl variant: sg(clip(r, 1-eps_low, 1+eps_high)))
        sapo:          -sigmoid(tau (r - 1)) 4/tau A,   tau = tau_pos if A > 0 else tau_neg
        vespo:         -phi A logp, phi = exp(lam + k log w - lam w) per sequence (detached), log w the
                       sum of the clamped token log-ratios plus the summed log vLLM ratio, clamped to
                       [log 1e-8, 20]; (k, lam) = vespo_k/lambda_pos if A >= 0 else _neg. The vLLM
                       ratio enters phi instead of multiplying the loss (TRL's get_gamma_weights).
        times the vLLM ratio, plus beta * k3 KL (exp(ref-logp) - (ref-logp) - 1), times r when
        ``use_bias_correction_kl``.
    Normalisers, with GA = gradient_accumulation_steps (TRL, train mode):
        grpo, sapo:  mean_b(sum_t m l / max(sum_t m, 1)) / GA
        bnpo:        sum m l / max(sum m, 1) / GA
        dr_grpo:     sum m l / (B * max_completion_length) / GA
        dapo, cispo, vespo: sum m l / (max(num_items_in_batch, 1) / num_processes * GA / steps_per_generation)
        luspo:       mean_b(sum_t m l) / GA

    Metrics (0-d device tensors, no host sync): ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean`` (TRL's definitions; for cispo TRL's ``cispo_clip_ratio`` is the
    high one), ``kl`` (only when beta != 0), ``ratio_mean`` (mean importance ratio before delta),
    ``num_tokens`` (sum of the mask), ``vespo/phi_seq_mean`` (vespo: mean phi over sequences),
    ``clip_ratio/dual_mean`` (only with ``dual_clip``: the share the dual clip capped, verl's
    ``pg_clipfrac_lower``).
    Token-level values are means over tokens; sequence-level ones over sequences, all sequences
    counted, as TRL does.

    Where we differ from TRL (all deliberate):
      * exp clamp, ratios: the importance log-ratio and the vLLM log-ratio are clamped to <= 20
        (verl's bound; exp(20) = 4.85e8), zero ratio-gradient past it. TRL overflows to inf at
        88.7 in fp32; below 20 the two agree exactly.
      * exp clamp, KL: the k3 KL is TRL's exactly while y = ref - logp <= 80 (KL_EXP_CLAMP; the
        log-ratio above also at most 20). Past 80, e^y is continued by its tangent e^80 (1 + y - 80):
        the KL stays finite and increasing, d KL / d logp = 1 - e^min(y, 80) keeps TRL's sign,
        |gradient| <= beta e^80 (|y| + 3) per token (times the normaliser). With bias correction
        the term kl * ratio = e^(y + log ratio) - (y + 1) ratio has that exponent capped at 80 too
        (finite where TRL's product overflows), and its gradient is taken in closed form: token
        level -y * ratio, TRL's exactly for any y (the e^y terms of the product rule cancel;
        a clamped e^y would leave them uncancelled and flip the sign); sequence level
        m_t C [S/M - e^y_t + 1 - sum(m)/M - mean(y)] (S = sum m e^y, M = max(sum m, 1)), with
        the e^y formed relative to the row's largest and only that common factor capped — the
        sign is TRL's, exact while the row's largest y plus its log-ratio is <= 80.
      * inputs at masked positions are zeroed before use; TRL multiplies by the mask, so a NaN or
        inf in padding turns its loss into NaN.
      * ``num_items_in_batch=None`` (TRL always passes it) falls back to this call's token count.
      * TRL's per-sequence ``clip_ratio/low_min`` / ``high_max``, the entropy bonus, top-entropy
        masking and off-policy sequence masking are not provided (the caller can fold masks into
        ``mask``).
      * dr_grpo without ``max_completion_length`` is a ValueError (TRL's config always has one,
        default 512). ``delta`` with cispo / sapo / vespo is ignored, as TRL ignores it; so are
        the SAPO temperatures and VESPO shapes for the loss types that do not read them.
    Where Liger and verl differ from TRL (we follow TRL):
      * Liger defaults ``use_bias_correction_kl=False``, ``beta=0.04``, and eps_high 0.4 (triton op)
        / 0.2 (chunked); TRL and we: True, 0.0, eps_high = eps_low.
      * Liger's luspo averages ``loss * len`` over all B*T positions, unmasked; TRL 1.16 sums each
        sequence's masked loss and averages over sequences. They agree only when the per-token
        loss is one value per sequence (sequence level, no KL, no per-token vLLM ratio).
      * Liger's clip metric for sequence-level ratios is token-weighted; TRL's counts sequences.
        Liger measures clipping before the delta cap; TRL after.
      * Liger's dapo without num_items_in_batch all-reduces the token count across ranks; we never
        communicate (pass num_items_in_batch).
      * verl clamps log-ratios to [-20, 20] on both sides; we clamp only above (below, exp -> 0 is
        harmless). verl's CISPO clips two-sided with relative bounds: ``cispo_variant='verl'``.
    """
    if block_size is not None and (not isinstance(block_size, int) or block_size < 16
                                   or block_size & (block_size - 1)):
        raise ValueError(f"grpo_loss: block_size={block_size} must be a power of two >= 16")
    kind = _resolve_backend(backend, logp.device if isinstance(logp, torch.Tensor) else torch.device("cpu"))
    if kind == "torch":
        return grpo_loss_reference(logp, old_logp, ref_logp, advantages, mask, cu_seqlens=cu_seqlens,
                                   sampling_logp=sampling_logp, vllm_is_ratio=vllm_is_ratio,
                                   num_items_in_batch=num_items_in_batch,
                                   dtype=_torch_compute_dtype(logp), **options)
    opts, inp = resolve_call(logp, old_logp, ref_logp, advantages, mask, cu_seqlens, sampling_logp,
                             vllm_is_ratio, options)
    num_items = check_num_items(num_items_in_batch)
    block, S, num_warps = _launch_config(inp, block_size, inp.logp.device)
    loss, mvec = GRPOLossFunction.apply(inp.logp, inp, opts, num_items, block, S, num_warps)
    metrics = {name: mvec[i] for i, name in enumerate(_METRIC_NAMES)}
    if opts.beta == 0.0:
        del metrics["kl"]
    if opts.loss_type != "vespo":
        del metrics["vespo/phi_seq_mean"]
    if opts.dual_clip is None:
        del metrics["clip_ratio/dual_mean"]
    return loss, metrics
