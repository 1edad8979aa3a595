"""Fused linear -> log-prob (+ entropy): the log-probability of each sampled token under
``softmax((hidden @ weight.T + bias) / T)``, without materialising [N, V] logits.

Shapes and dtypes
    hidden  : [N, H]  bf16 / fp16 / fp32   (leading dims [..., H] are flattened by the wrapper)
    weight  : [V, H]  same dtype as hidden (the lm_head; a plain tensor, not an FSDP2 shard)
    bias    : [V]     any float dtype, optional
    targets : [N]     int32 / int64, 0 <= t < V
    out     : logp [N] fp32, entropy [N] fp32 (entropy of softmax(z), z = logits / T)

Design: recompute in backward, 8NHV FLOPs in all, deterministic (no atomics, fixed tiles per
arch, no autotuning whose pick could change the summation order between runs).
    forward   one kernel, tiles of BLOCK_N tokens x BLOCK_V vocab columns. Each program owns a
              token tile and a contiguous range of FWD_SPLIT_TILES vocab tiles (a "split"),
              computes the logit tile z = (h @ W_tile^T + b) / T in fp32 and folds it into an
              online log-sum-exp (running max m, sum s = sum exp(z - m), t = sum exp(z - m)(z - m),
              target logit). The split partials [4, SPLITS, N] are merged by a few torch ops (no
              host sync). Grid: one axis, rasterised in groups of GROUP_N token tiles that sweep
              all splits together, so the CTAs resident at one time read GROUP_N h tiles and a
              band of W tiles that both stay in L2 (at the 7B head on sm_90: 8 h tiles of
              128 x 3584 bf16 = 7.3 MB and ~17 splits' W tiles of 128 x 3584 = 15 MB, against
              50 MB of L2); each W tile then comes from HBM once per GROUP_N token tiles.
    forward, TMA (sm_90, bf16 / fp16; opt-in: ``tma=True`` or STAGED_LOGPROB_TMA=1)
              _linear_logprob_fwd_tma_kernel: the same work items, raster, K loop and online
              log-sum-exp (_online_lse), with the h and W tiles loaded through device-side
              tensor descriptors (tl.make_tensor_descriptor, in triton 3.6 and 3.9 alike:
              cp.async.bulk.tensor + mbarriers in the PTX, wgmma dots) on a persistent grid of
              one program per SM walking the work items in raster order. Why: TMA moves a tile
              with one instruction from one thread instead of every thread computing addresses
              and masks (the cp.async path's 182-249 registers at 128 x 128 drop to 169-182),
              zero-fills the edges (no K mask: any H with 16-byte rows, not only H % 64 == 0),
              and the persistent grid keeps one CTA per SM for the whole launch (descriptors
              built once per program, not once per work item; at the 7B head and N = 16k there
              are ~4.9k work items, ~37 waves on 132 SMs). Deterministic: each
              work item is computed whole by one program in one order, so the result is bit for
              bit that of a launch with one program per work item (tested). The descriptors need
              a 256-byte global scratch per program, which Triton requests through
              triton.set_allocator: the launcher sets a PyTorch allocator when none is set.
              Where a descriptor cannot take the tensors (a base or row stride not a multiple of
              16 bytes, e.g. bf16 H = 59), on sm_80, or for fp32, tma=True runs the cp.async
              forward instead (tested). Not the default because it has not run on a GPU yet:
              `make gpu-check` times it beside the cp.async forward (``staged (tma)`` rows,
              ``vs_cp_async``) and the first GPU session decides. The backward is unchanged.
    backward  split along the vocabulary, as verl's fused kernel does. For each slice of VS
              columns: (1) a kernel recomputes the slice's logit tiles and writes dz[N, VS] in
              the input dtype with the softmax / entropy gradient fused in its epilogue; (2)
              cuBLAS writes dW[slice] = dz^T @ h once (K = N: no dW accumulator, no re-read);
              (3) a Triton GEMM adds dz @ W[slice] into dH. dH is the only accumulator. For
              bf16/fp16 it is held as two planes hi + lo in the input dtype (hi is the returned
              gradient; lo the rounding residual, a compensated sum): ~16 significant bits per
              partial sum for bf16, while an fp32 [N, H] accumulator would alone be H / V of the
              fp32 logits (2.4% at the 7B head, over the 2% budget). VS is chosen so that all
              transient buffers stay within BWD_WORKSPACE_FRACTION of N * V * 4 bytes; see
              fused_linear_logprob_workspace.
    Why not a fully fused backward: dH [BLOCK_N, H] and dW [BLOCK_V, H] accumulators do not fit in
    registers at H = 3584, and keeping them in global memory (read-modify-write or atomics per
    [BLOCK_N, BLOCK_V] tile) moves 8 * (BLOCK_N + BLOCK_V) * H bytes per 4 * BLOCK_N * BLOCK_V * H
    FLOPs, ~21 FLOP/byte at 64 x 128 tiles: HBM-bound at a tenth of tensor-core speed. Atomics
    would also make dW non-deterministic.

Gradients (z = logits / T, p = softmax(z), lse = logsumexp(z), ent = lse - sum_j p_j z_j):
    d logp / d z_j = onehot_j - p_j
    d ent  / d z_j = -p_j (z_j - sum_k p_k z_k) = -p_j (log p_j + ent)
    dlogits = (g_logp * (onehot - p) - g_ent * p * (log p + ent)) / T;   db = sum_n dlogits

FLOP / byte model (e = bytes per input element, k = ceil(V / VS) slices; the benchmark reports
TFLOP/s from the FLOPs, and the bytes bound the memory-side time)
    forward : 2 N H V (logit GEMM) + ~8 N V (exp, max, sums). HBM: h once (N H e), W once per
              group of GROUP_N token tiles (ceil(N / (GROUP_N BLOCK_N)) V H e), partials 16 N SPLITS.
    backward: 6 N H V (recompute 2NHV, dW 2NHV, dH 2NHV) + ~10 N V. HBM per slice: h twice
              (recompute, dW: 2 N H e), the W slice (L2-resident across the slice), dz written
              once and read twice (3 N VS e), dH planes read and written (4 N H e, compensated);
              in all ~k (6 N H e) + 3 N V e + V H e. At the 7B head, N = 16k, bf16, VS = 2304:
              k = 66 and ~47 GB, against 5.4e16 FLOPs: ~10 ms of HBM at 4.8 TB/s overlapped with
              ~75 ms of tensor-core time (model, not a measurement).
    total   : 8 N H V FLOPs, against 6 N H V for the bare lm_head GEMMs of forward + backward.

Host syncs: none on CUDA. Out-of-range targets are caught with torch._assert_async there (the
error surfaces at a later launch); on CPU they raise ValueError at once.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from staged.kernels.aot import register_aot
from staged.kernels.device import sm_count, tf32_enabled
from staged.kernels.linear_logprob_chunked import chunked_linear_logprob

# Transient device memory of forward + backward, as a fraction of the fp32 logits N * V * 4 B
# they avoid: the backward's vocab slice VS is the largest that fits (>= _MIN_SLICE_COLS).
BWD_WORKSPACE_FRACTION = float(os.environ.get("STAGED_LOGPROB_WORKSPACE_PCT", "2")) / 100
# Below ~1k columns the per-slice GEMMs (M = VS for dW, K = VS for dH) stop filling the GPU.
_MIN_SLICE_COLS = 1024
# torch.mm(..., out_dtype=torch.float32, out=...) from 16-bit operands (CUDA, torch >= 2.8)
_MM_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads()

# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _logit_tile(h_rows, w_cols, b_ptr, offs_v, mask_n, mask_v, H,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                ALIGNED: tl.constexpr, LOGIT_ROUND: tl.constexpr, RNE_BF16: tl.constexpr):
    """One [BLOCK_N, BLOCK_V] tile of hidden @ weight^T (+ bias) in fp32: the forward computes
    it and the backward recomputes it, so both must run exactly this loop. LOGIT_ROUND (1 bf16,
    2 fp16, 0 off) rounds it as an lm_head under autocast does (see _round_logits)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        hp = h_rows + offs_k[None, :]
        wp = w_cols + offs_k[:, None]
        if ALIGNED:
            # The launcher checked: H % BLOCK_H == 0 (no K mask), 16-byte aligned rows and
            # bases. The hint repeats what the JIT's divisibility-16 specialisation tells the
            # compiler, so that vectorised, pipelined loads survive any argument attribute.
            hk = tl.load(tl.multiple_of(hp, [16, 16]), mask=mask_n[:, None], other=0.0)
            wk = tl.load(tl.multiple_of(wp, [16, 16]), mask=mask_v[None, :], other=0.0)
        else:
            mask_k = offs_k < H
            hk = tl.load(hp, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            wk = tl.load(wp, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        if DOT_F32:
            hk = hk.to(tl.float32)
            wk = wk.to(tl.float32)
        acc = tl.dot(hk, wk, acc, input_precision=PRECISION)
    return _add_bias_rounded(acc, b_ptr, offs_v, mask_v, HAS_BIAS, LOGIT_ROUND, RNE_BF16)


@triton.jit
def _add_bias_rounded(acc, b_ptr, offs_v, mask_v, HAS_BIAS: tl.constexpr, LOGIT_ROUND: tl.constexpr,
                      RNE_BF16: tl.constexpr):
    """The GEMM's fp32 sums -> the logit tile: rounded (LOGIT_ROUND), plus the bias, rounded
    again, as an autocast lm_head writes and biases its output (see _round_logits)."""
    acc = _round_logits(acc, LOGIT_ROUND, RNE_BF16)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        acc = _round_logits(acc, LOGIT_ROUND, RNE_BF16)
    return acc


@triton.jit
def _bf16_rne(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (a later .to(bf16) is then exact). Only
    for the interpreter, whose fp32 -> bf16 cast truncates; GPUs round to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_logits(x, LOGIT_ROUND: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 -> fp32 holding x rounded to nearest even in bf16 (LOGIT_ROUND = 1) or fp16 (2); x
    itself for 0. An lm_head under autocast (TRL's ChunkedLogProbFunction, a plain nn.Linear)
    writes its GEMM's fp32 sums into a half-precision tile, and adds the bias in it: the same two
    roundings here, before the temperature and the log-sum-exp, in forward and backward alike."""
    if LOGIT_ROUND == 1:
        if RNE_BF16:
            x = _bf16_rne(x)
        else:
            x = x.to(tl.bfloat16).to(tl.float32)
    elif LOGIT_ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _grouped(pid, num_pid_a, num_pid_b, GROUP_A: tl.constexpr):
    """(pid_a, pid_b) of a 1-D grid in groups of GROUP_A a-tiles that sweep all b-tiles side by
    side (Triton's matmul tutorial): CTAs resident at once share their b-side operand in L2."""
    per_group = GROUP_A * num_pid_b
    first_a = (pid // per_group) * GROUP_A
    group_size = tl.minimum(num_pid_a - first_a, GROUP_A)
    pid_a = first_a + (pid % per_group) % group_size
    pid_b = (pid % per_group) // group_size
    return pid_a, pid_b


@triton.jit
def _lse_start(BLOCK_N: tl.constexpr):
    """The running (max m, sum s, entropy term t, target logit zt) of BLOCK_N rows before the
    first vocab tile; t = sum exp(z - m) (z - m), kept relative to m: entropy without cancelling."""
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    return m, tl.zeros([BLOCK_N], tl.float32), tl.zeros([BLOCK_N], tl.float32), tl.zeros([BLOCK_N], tl.float32)


@triton.jit
def _store_partials(out, mask_n, stride_part, m, s, t, zt):
    """One split's (m, s, t, zt) of its rows into the [4, SPLITS, N] partials."""
    tl.store(out, m, mask=mask_n)
    tl.store(out + stride_part, s, mask=mask_n)
    tl.store(out + 2 * stride_part, t, mask=mask_n)
    tl.store(out + 3 * stride_part, zt, mask=mask_n)


@triton.jit
def _online_lse(z, offs_v, tgt, m, s, t, zt):
    """Fold one tile of tempered logits z [BLOCK_N, BLOCK_V] (columns past V at -inf) into a
    token tile's running (max m, sum s = sum exp(z - m), t = sum exp(z - m)(z - m), target
    logit zt); returns the new four. Both forward kernels (cp.async and TMA) run exactly this."""
    # The target logit first, so that z dies into d below: at 128 x 128 tiles (sm_90) one
    # more live [BLOCK_N, BLOCK_V] fp32 tile is 64 registers a thread, and spills.
    zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    m_new = tl.maximum(m, tl.max(z, axis=1))           # finite: the tile has a valid column
    alpha = tl.exp(m - m_new)                           # 0 on the first tile (m = -inf)
    # Masked columns: z = -inf, clamped to a finite d so that e = 0 and e * d = 0 (not
    # 0 * -inf). A clamp, not tl.where(mask, ...): the select kept one more tile live and
    # spilled on sm_90 with bias (triton 3.9).
    d = tl.maximum(z - m_new[:, None], -3.0e38)
    e = tl.exp(d)
    # t is relative to the running max: shifting m_old -> m_new adds s * (m_old - m_new).
    # (m_old is -inf before the first tile, where s = 0: use a shift of 0, not 0 * -inf.)
    m_old = tl.where(s > 0, m, m_new)
    t = alpha * (t + s * (m_old - m_new)) + tl.sum(e * d, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, t, zt


@triton.jit
def _linear_logprob_fwd_kernel(
    # pointers
    h_ptr,          # [N, H] hidden, row stride stride_hn, unit column stride
    w_ptr,          # [V, H] weight, row stride stride_wv, unit column stride
    b_ptr,          # [V] bias (never read when HAS_BIAS is False)
    tgt_ptr,        # [N] targets, int32/int64
    part_ptr,       # [4, SPLITS, N] fp32 partials: max m, sum s, sum t, target logit
    # sizes
    N, V, H,
    tiles_per_split,  # vocab tiles per split; split s covers tiles [s*tps, (s+1)*tps)
    n_splits,
    stride_hn, stride_wv,
    stride_part,      # SPLITS * N: distance between the four partial planes
    inv_temp,         # 1 / temperature
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,     # upcast dot operands to fp32 (interpreter: its bf16 dot is wrong)
    PRECISION: tl.constexpr,   # tl.dot input_precision for fp32 operands ("ieee" or "tf32")
    ALIGNED: tl.constexpr,     # H % BLOCK_H == 0 and 16-byte aligned rows: unmasked K loads
    LOGIT_ROUND: tl.constexpr,  # 0 fp32 logits; 1 / 2: rounded to bf16 / fp16 (_round_logits)
    RNE_BF16: tl.constexpr,    # interpreter + bf16: round explicitly (see _bf16_rne)
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,     # token tiles that sweep the splits together (L2 reuse of W, h)
):
    pid_n, pid_s = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn      # int64: N*H may pass 2^31

    m, s, t, zt = _lse_start(BLOCK_N)

    v_lo = pid_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)   # every split starts inside V
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
        acc = _logit_tile(h_rows, w_cols, b_ptr, offs_v, mask_n, mask_v, H, BLOCK_N, BLOCK_V, BLOCK_H,
                          HAS_BIAS, DOT_F32, PRECISION, ALIGNED, LOGIT_ROUND, RNE_BF16)
        z = tl.where(mask_v[None, :], acc * inv_temp, float("-inf"))
        m, s, t, zt = _online_lse(z, offs_v, tgt, m, s, t, zt)

    _store_partials(part_ptr + pid_s * N + offs_n, mask_n, stride_part, m, s, t, zt)


@triton.jit
def _logit_tile_tma(h_desc, w_desc, b_ptr, off_n, off_v, offs_v, mask_v, H,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                    LOGIT_ROUND: tl.constexpr, RNE_BF16: tl.constexpr):
    """_logit_tile with the h and W tiles brought in through tensor descriptors (TMA on sm_90):
    the same K loop, dots and roundings. The descriptors zero-fill rows past N and V and columns
    past H, so there are no masks and H need not be a multiple of BLOCK_H."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        hk = h_desc.load([off_n, k0])         # [BLOCK_N, BLOCK_H]
        wk = w_desc.load([off_v, k0])         # [BLOCK_V, BLOCK_H], K-major: transposed below
        if DOT_F32:
            hk = hk.to(tl.float32)
            wk = wk.to(tl.float32)
        acc = tl.dot(hk, tl.trans(wk), acc, input_precision=PRECISION)
    return _add_bias_rounded(acc, b_ptr, offs_v, mask_v, HAS_BIAS, LOGIT_ROUND, RNE_BF16)


@triton.jit
def _linear_logprob_fwd_tma_kernel(
    # pointers (the TMA path: 16-byte aligned bases and row strides, checked by the launcher)
    h_ptr,          # [N, H] hidden, row stride stride_hn, unit column stride
    w_ptr,          # [V, H] weight, row stride stride_wv, unit column stride
    b_ptr,          # [V] bias (never read when HAS_BIAS is False)
    tgt_ptr,        # [N] targets, int32/int64
    part_ptr,       # [4, SPLITS, N] fp32 partials, as _linear_logprob_fwd_kernel
    # sizes
    N, V, H,
    tiles_per_split, n_splits,
    stride_hn, stride_wv,
    stride_part,
    inv_temp,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr, LOGIT_ROUND: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """The forward of _linear_logprob_fwd_kernel with TMA loads and a persistent grid: the
    launch has (at most) one program per SM, and program p takes work items p, p + P, p + 2P,
    ... of the same grouped raster (a work item = one token tile x one split). Every partial
    is computed by one program with the same sequence of operations whatever P is, so the
    output is deterministic and the same as a launch with one program per work item."""
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[N, H], strides=[stride_hn, 1],
                                       block_shape=[BLOCK_N, BLOCK_H])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[stride_wv, 1],
                                       block_shape=[BLOCK_V, BLOCK_H])
    n_tiles = tl.cdiv(N, BLOCK_N)
    for work in range(tl.program_id(0), n_tiles * n_splits, tl.num_programs(0)):
        pid_n, pid_s = _grouped(work, n_tiles, n_splits, GROUP_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)

        m, s, t, zt = _lse_start(BLOCK_N)
        v_lo = pid_s * tiles_per_split * BLOCK_V
        v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            acc = _logit_tile_tma(h_desc, w_desc, b_ptr, pid_n * BLOCK_N, v0, offs_v, mask_v, H,
                                  BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, DOT_F32, PRECISION,
                                  LOGIT_ROUND, RNE_BF16)
            z = tl.where(mask_v[None, :], acc * inv_temp, float("-inf"))
            m, s, t, zt = _online_lse(z, offs_v, tgt, m, s, t, zt)

        _store_partials(part_ptr + pid_s * N + offs_n, mask_n, stride_part, m, s, t, zt)


@triton.jit
def _linear_logprob_bwd_kernel(
    # pointers
    h_ptr,          # [N, H] hidden
    w_ptr,          # [V, H] weight (the whole table: the slice is v0 ... v0 + n_cols)
    b_ptr,          # [V] bias (never read when HAS_BIAS is False)
    tgt_ptr,        # [N] targets
    lse_ptr,        # [N] fp32 log-sum-exp of z saved by the forward
    ent_ptr,        # [N] fp32 entropy saved by the forward (read only when HAS_GENT)
    glogp_ptr,      # [N] fp32 upstream grad of logp (read only when HAS_GLOGP)
    gent_ptr,       # [N] fp32 upstream grad of entropy (read only when HAS_GENT)
    dz_ptr,         # [N, >= n_cols] out: dlogits of the slice in the input dtype
    # sizes
    N, V, H,
    v0, n_cols,     # the vocab slice: columns [v0, v0 + n_cols)
    stride_hn, stride_wv, stride_dzn,
    inv_temp,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    LOGIT_ROUND: tl.constexpr,  # the forward's: the recomputed tile must be the same
    RNE_BF16: tl.constexpr,  # interpreter + bf16: round dz explicitly (see _bf16_rne)
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,   # token tiles that walk the slice together (L2 reuse of W tiles)
):
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(n_cols, BLOCK_V),
                            GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)       # column within the slice
    offs_v = v0 + offs_c
    mask_n = offs_n < N
    mask_v = offs_c < n_cols
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv

    acc = _logit_tile(h_rows, w_cols, b_ptr, offs_v, mask_n, mask_v, H, BLOCK_N, BLOCK_V, BLOCK_H,
                      HAS_BIAS, DOT_F32, PRECISION, ALIGNED, LOGIT_ROUND,
                      RNE_BF16)   # the forward's tile, recomputed

    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    # log p_j; rows past N are zeroed so that their (unstored) lanes never overflow exp.
    logp = tl.where(mask_n[:, None], acc * inv_temp - lse[:, None], 0.0)
    p = tl.exp(logp)
    dz = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if HAS_GLOGP:
        g = tl.load(glogp_ptr + offs_n, mask=mask_n, other=0.0)
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)
        onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
        dz += g[:, None] * (onehot - p)
    if HAS_GENT:
        ge = tl.load(gent_ptr + offs_n, mask=mask_n, other=0.0)
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        dz -= ge[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_temp
    if RNE_BF16:
        dz = _bf16_rne(dz)
    out = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dzn + offs_c[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


@triton.jit
def _linear_logprob_dh_kernel(
    # pointers
    dz_ptr,         # [N, >= K] dlogits of the slice (input dtype), row stride stride_dzn
    w_ptr,          # [V, H] weight: rows v0 ... v0 + K are the slice
    hi_ptr,         # [N, H] dH (input dtype): the returned gradient; fp32 when not COMPENSATED
    lo_ptr,         # [N, H] rounding residual of dH (input dtype; read only when COMPENSATED)
    # sizes
    N, H, K, v0,
    stride_dzn, stride_wv, stride_on,
    # meta-parameters
    FIRST: tl.constexpr,        # first slice: dH starts at 0, the planes are not read
    COMPENSATED: tl.constexpr,  # dH kept as hi + lo in a 16-bit dtype (else plain fp32)
    RNE_BF16: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,      # token tiles sharing each W column block in L2
):
    """dH[N, H] (+)= dz[N, K] @ W[v0:v0+K, H], the sum carried across slices in hi + lo."""
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(H, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < N
    mask_h = offs_h < H
    a_rows = dz_ptr + offs_m.to(tl.int64)[:, None] * stride_dzn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + (v0 + offs_k).to(tl.int64)[:, None] * stride_wv + offs_h[None, :],
                    mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    off = offs_m.to(tl.int64)[:, None] * stride_on + offs_h[None, :]
    mask = mask_m[:, None] & mask_h[None, :]
    if not FIRST:
        acc += tl.load(hi_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if COMPENSATED:
            acc += tl.load(lo_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if COMPENSATED:
        # hi = acc rounded to the storage dtype, lo = what that rounding lost (rounded again):
        # hi + lo carries ~2x the dtype's significand, and hi alone is the correctly rounded dH.
        if RNE_BF16:
            hi = _bf16_rne(acc)
            lo = _bf16_rne(acc - hi)
        else:
            hi = acc.to(hi_ptr.dtype.element_ty).to(tl.float32)
            lo = acc - hi
        tl.store(hi_ptr + off, hi.to(hi_ptr.dtype.element_ty), mask=mask)
        tl.store(lo_ptr + off, lo.to(lo_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(hi_ptr + off, acc.to(hi_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# GPU launch configurations, and their ahead-of-time registration (the same table feeds both)

# (arch, operand bits, aligned) -> tiles, warps, stages. arch: 80 (Ampere, mma.sync) or 90
# (Hopper and later: wgmma). "aligned": H % BLOCK_H == 0, 16-byte aligned base pointers and row
# strides: every real lm_head (H = 896 ... 8192). The unaligned variant (odd H such as 59, or a
# misaligned view) masks K and cannot use vectorised async copies, so it keeps its loads in
# registers: smaller K tiles and no pipelining keep it from spilling. fp32 ("ieee" dots run on
# the FMA units, operands in registers) uses 64 x 64 tiles for the same reason.
# sm_90 bf16: 128 x 128 tiles, so that each of the two warpgroups issues wgmma m64n128 (a
# 64 x 128 tile with 8 warps splits N and gets n = 64, half the operand reuse per instruction).
_LOGIT_CONFIGS = {
    (80, "16", True): {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
    (90, "16", True): {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
    (80, "32", True): {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3},
    (80, "16", False): {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 1},
    (80, "32", False): {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 16, "num_warps": 8, "num_stages": 1},
}
for _bits, _al in (("32", True), ("16", False), ("32", False)):
    _LOGIT_CONFIGS[(90, _bits, _al)] = _LOGIT_CONFIGS[(80, _bits, _al)]

# The dH GEMM (M = tokens, N = hidden, K = slice columns): a plain tiled GEMM with a
# read-modify-write epilogue. 128 x 128 x 64 bf16 is the tutorial's Ampere/Hopper tile.
_DH_CONFIGS = {
    (80, "16", True): {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    (90, "16", True): {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
    (80, "32", True): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    (80, "16", False): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    # fp32 loads are 4-byte cp.async even unaligned, so this one pipelines too; K = 16 because
    # K = 32 spilled 8 bytes on sm_90 (triton 3.6 and 3.9).
    (80, "32", False): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
}
for _bits, _al in (("32", True), ("16", False), ("32", False)):
    _DH_CONFIGS[(90, _bits, _al)] = _DH_CONFIGS[(80, _bits, _al)]

# The TMA forward (sm_90, 16-bit operands): the aligned sm_90 tiles; TMA zero-fills the K tail,
# so H need only give 16-byte row strides, not H % BLOCK_H == 0. One program per SM, the
# persistent grid: at 169-182 registers x 256 threads a second CTA would not fit an SM's 64k.
_TMA_CONFIG = {**_LOGIT_CONFIGS[(90, "16", True)], "CTAS_PER_SM": 1}
# Device-side descriptors (h and W) live in a global scratch the launcher allocates through
# triton.set_allocator: 128 bytes each per program.
_TMA_SCRATCH_PER_PROGRAM = 256
# STAGED_LOGPROB_TMA=1: the TMA forward where it applies (see fused_linear_logprob's ``tma``).
_TMA_ENV = "STAGED_LOGPROB_TMA"

_GROUP = 8                # token tiles per raster group, forward, recompute and dH
FWD_SPLIT_TILES = 32      # vocab tiles per forward split: 4096 columns at BLOCK_V = 128
_FWD_MIN_PROGRAMS = 1024  # small N: more splits, so that >= ~8 waves of 132 SMs still run

_FWD_SIG = {
    "h_ptr": "*{t}", "w_ptr": "*{t}", "b_ptr": "*{t}", "tgt_ptr": "*i64", "part_ptr": "*fp32",
    "N": "i32", "V": "i32", "H": "i32", "tiles_per_split": "i32", "n_splits": "i32",
    "stride_hn": "i32", "stride_wv": "i32", "stride_part": "i32", "inv_temp": "fp32",
}
_BWD_SIG = {
    "h_ptr": "*{t}", "w_ptr": "*{t}", "b_ptr": "*{t}", "tgt_ptr": "*i64",
    "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32",
    "dz_ptr": "*{t}", "N": "i32", "V": "i32", "H": "i32", "v0": "i32", "n_cols": "i32",
    "stride_hn": "i32", "stride_wv": "i32", "stride_dzn": "i32", "inv_temp": "fp32",
}
_DH_SIG = {
    "dz_ptr": "*{t}", "w_ptr": "*{t}", "hi_ptr": "*{t}", "lo_ptr": "*{t}",
    "N": "i32", "H": "i32", "K": "i32", "v0": "i32",
    "stride_dzn": "i32", "stride_wv": "i32", "stride_on": "i32",
}
# What the JIT marks divisible by 16 at a real launch (triton specialises every pointer whose
# address, and every int whose value, is a multiple of 16): pointers are fresh allocations or
# aligned views; strides are multiples of 16 elements in the aligned configs (H % 64 == 0, dz
# rows padded); v0 is a multiple of the slice width. Sizes N, V, n_cols, K are not assumed.
_DIV_PTRS = ("h_ptr", "w_ptr", "b_ptr", "tgt_ptr", "part_ptr", "lse_ptr", "ent_ptr",
             "glogp_ptr", "gent_ptr", "dz_ptr", "hi_ptr", "lo_ptr")
_DIV_STRIDES = ("stride_hn", "stride_wv", "stride_dzn", "stride_on", "stride_part", "H")


def _divisible(sig: dict, aligned: bool) -> list[str]:
    names = [k for k in sig if k in _DIV_PTRS or k == "v0"]
    if aligned:
        names += [k for k in sig if k in _DIV_STRIDES]
    else:
        # dz rows are padded to 16 B whatever H is; h, W and dH rows follow H.
        names += [k for k in sig if k == "stride_dzn"]
    return names


def _register_all() -> None:
    for (arch, bits, aligned), cfg in _LOGIT_CONFIGS.items():
        t, prec = ("bf16", "tf32") if bits == "16" else ("fp32", "ieee")
        blocks = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}
        common = {"DOT_F32": False, "PRECISION": prec, "ALIGNED": aligned, **blocks,
                  "GROUP_N": _GROUP, "RNE_BF16": False}
        tag = f"sm{arch},{t},{'aligned' if aligned else 'unaligned'}"
        launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "archs": (arch,)}
        fwd_sig = {k: v.format(t=t) for k, v in _FWD_SIG.items()}
        bwd_sig = {k: v.format(t=t) for k, v in _BWD_SIG.items()}
        # bf16 operands also with their logits rounded to bf16 (logit_dtype: an autocast lm_head)
        for rnd in ((0, 1) if bits == "16" else (0,)):
            rtag = ",round=bf16" if rnd else ""
            for bias in (False, True):
                register_aot(_linear_logprob_fwd_kernel, fwd_sig,
                             {"HAS_BIAS": bias, "LOGIT_ROUND": rnd, **common},
                             name=f"_linear_logprob_fwd_kernel[{tag},bias={int(bias)}{rtag}]",
                             divisible=_divisible(fwd_sig, aligned), **launch)
            # logp only (plain GRPO), logp + entropy (entropy bonus / metrics), entropy only.
            for bias, gl, ge in ((False, True, False), (False, True, True), (True, True, True),
                                 (False, False, True)):
                register_aot(_linear_logprob_bwd_kernel, bwd_sig,
                             {"HAS_BIAS": bias, "HAS_GLOGP": gl, "HAS_GENT": ge,
                              "LOGIT_ROUND": rnd, **common},
                             name=f"_linear_logprob_bwd_kernel[{tag},bias={int(bias)},"
                                  f"logp={int(gl)},ent={int(ge)}{rtag}]",
                             divisible=_divisible(bwd_sig, aligned), **launch)
        dcfg = _DH_CONFIGS[(arch, bits, aligned)]
        dh_sig = {k: v.format(t=t) for k, v in _DH_SIG.items()}
        if bits == "32":
            dh_sig["lo_ptr"] = "*fp32"
        # 16-bit operands: dH in hi + lo planes of their dtype, or (logit_dtype with fp32
        # inputs: autocast) one fp32 plane, as TRL accumulates it
        for dh_f32 in ((False, True) if bits == "16" else (False,)):
            sig = {**dh_sig, "hi_ptr": "*fp32", "lo_ptr": "*fp32"} if dh_f32 else dh_sig
            for first in (True, False):
                register_aot(_linear_logprob_dh_kernel, sig,
                             {"FIRST": first, "COMPENSATED": bits == "16" and not dh_f32,
                              "RNE_BF16": False, "DOT_F32": False, "PRECISION": prec,
                              "GROUP_M": _GROUP,
                              **{k: dcfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}},
                             name=f"_linear_logprob_dh_kernel[{tag},first={int(first)}"
                                  f"{',dh=fp32' if dh_f32 else ''}]",
                             divisible=_divisible(sig, aligned), num_warps=dcfg["num_warps"],
                             num_stages=dcfg["num_stages"], archs=(arch,))


_register_all()


def _register_tma() -> None:
    """The TMA forward, sm_90 bf16, with and without bias; and the launch where the row strides
    are 16-byte but not 32-byte multiples (H % 16 == 8, e.g. 72: the JIT drops the strides'
    divisibility), which TMA still takes."""
    sig = {k: v.format(t="bf16") for k, v in _FWD_SIG.items()}
    common = {"DOT_F32": False, "PRECISION": "tf32", "GROUP_N": _GROUP, "RNE_BF16": False,
              **{k: _TMA_CONFIG[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}}
    launch = {"num_warps": _TMA_CONFIG["num_warps"], "num_stages": _TMA_CONFIG["num_stages"],
              "archs": (90,)}
    for rnd in (0, 1):  # 1: logits rounded to bf16 (logit_dtype: an autocast lm_head)
        for bias in (False, True):
            register_aot(_linear_logprob_fwd_tma_kernel, sig, {"HAS_BIAS": bias, "LOGIT_ROUND": rnd, **common},
                         name=f"_linear_logprob_fwd_tma_kernel[sm90,bf16,bias={int(bias)}"
                              f"{',round=bf16' if rnd else ''}]",
                         divisible=_divisible(sig, True), **launch)
    register_aot(_linear_logprob_fwd_tma_kernel, sig, {"HAS_BIAS": False, "LOGIT_ROUND": 0, **common},
                 name="_linear_logprob_fwd_tma_kernel[sm90,bf16,bias=0,stride%16=8]",
                 divisible=_divisible(sig, False), **launch)


_register_tma()


# ---------------------------------------------------------------------------------------------
# launchers


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1"


def _aligned(tensors, H: int, block_h: int) -> bool:
    if H % block_h:
        return False
    for t in tensors:
        e = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * e) % 16:
            return False
    return True


def _tma_requested(tma) -> bool:
    """``tma`` of fused_linear_logprob: True / False, or None = the STAGED_LOGPROB_TMA env var
    ("1" = on; off when unset: nothing of the TMA path has run on a GPU yet)."""
    if tma is None:
        return os.environ.get(_TMA_ENV, "0").strip().lower() in ("1", "true", "on", "yes")
    if not isinstance(tma, bool):
        raise ValueError(f"tma must be None, True or False; got {tma!r}")
    return tma


def _tma_eligible(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where the TMA forward applies: bf16 / fp16 operands (fp32 "ieee" dots are FMA work from
    registers: nothing for TMA to feed), an sm_90+ GPU (or the interpreter, for the tests), and
    what a TMA descriptor requires: 16-byte aligned bases and row strides (H * elem_size a
    multiple of 16). Anything else runs the cp.async forward: the fallback, chosen silently."""
    if hidden.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not _interpreting(hidden) and _arch(hidden.device) < 90:
        return False
    for t in (hidden, weight):
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16 or t.stride(1) != 1:
            return False
    return True


def _torch_scratch(size: int, alignment: int, stream):
    # triton.set_allocator's allocator: the descriptors' scratch from PyTorch's caching
    # allocator (256-byte aligned; on the current device, where Triton launches)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need a global scratch Triton obtains through
    ``triton.set_allocator`` (a context variable: per thread). Set ours where none is set; an
    allocator the caller set is kept."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        current = _allocator.get()
    except (ImportError, AttributeError):   # another layout: set ours
        current, NullAllocator = None, type(None)
    if current is None or isinstance(current, NullAllocator):
        triton.set_allocator(_torch_scratch)


# Tests may override (e.g. GPU-sized tiles under the interpreter): dict merged into the config.
_CONFIG_OVERRIDE: dict = {}

# Interpreter tiles: small, so that tests at interpreter-friendly sizes cross many tile, split,
# group and slice edges. TMA: the same tiles, on a pretend 3-SM machine (a persistent grid with
# fewer programs than work items, not dividing them).
_INTERP_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 1,
                  "GROUP_N": 2, "SPLIT_TILES": 2, "MIN_PROGRAMS": 8, "MIN_SLICE": 32,
                  "DH_BLOCK_M": 16, "DH_BLOCK_N": 32, "DH_BLOCK_K": 32, "DH_num_warps": 4,
                  "DH_num_stages": 1}
_INTERP_TMA_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 1,
                      "PROGRAMS": 3, "SCRATCH": 0}


def _arch(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _gpu_config(arch: int, bits: str, aligned: bool) -> dict:
    d = _DH_CONFIGS[(arch, bits, aligned)]
    return {**_LOGIT_CONFIGS[(arch, bits, aligned)], "GROUP_N": _GROUP,
            "SPLIT_TILES": FWD_SPLIT_TILES, "MIN_PROGRAMS": _FWD_MIN_PROGRAMS,
            "MIN_SLICE": _MIN_SLICE_COLS,
            **{f"DH_{k}": v for k, v in d.items()}}


def _config(hidden: torch.Tensor, weight: torch.Tensor, tma=False) -> dict:
    """Tiles, warps, stages and dot flags for this launch. ``cfg["TMA"]``: None, or the TMA
    forward's tiles and persistent program count when ``tma`` asks for it and it applies
    (_tma_eligible); the backward never reads it."""
    cfg = _base_config(hidden, weight)
    cfg["TMA"] = None
    if _tma_requested(tma) and _tma_eligible(hidden, weight):
        if _interpreting(hidden):
            cfg["TMA"] = dict(_INTERP_TMA_CONFIG)
        else:
            cfg["TMA"] = {k: _TMA_CONFIG[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps",
                                                       "num_stages")}
            cfg["TMA"]["PROGRAMS"] = sm_count(hidden.device) * _TMA_CONFIG["CTAS_PER_SM"]
            cfg["TMA"]["SCRATCH"] = _TMA_SCRATCH_PER_PROGRAM
        cfg["TMA"].update(_CONFIG_OVERRIDE.get("TMA") or {})
    return cfg


def _fwd_config(cfg: dict) -> dict:
    """The forward's view of a config: the TMA tiles when the TMA forward runs."""
    return {**cfg, **cfg["TMA"]} if cfg.get("TMA") else cfg


def _base_config(hidden: torch.Tensor, weight: torch.Tensor) -> dict:
    if _interpreting(hidden):
        # The interpreter's bf16 tl.dot multiplies the raw uint16 storage (triton 3.9), so
        # operands are upcast to fp32: the same products, exact in fp32, that tensor cores form.
        cfg = {**_INTERP_CONFIG, "DOT_F32": True, "PRECISION": "ieee",
               "RNE_BF16": hidden.dtype == torch.bfloat16}
        cfg.update({k: v for k, v in _CONFIG_OVERRIDE.items() if k != "TMA"})
        cfg["ALIGNED"] = _aligned((hidden, weight), hidden.shape[1], cfg["BLOCK_H"])
        return cfg
    bits = "32" if hidden.dtype == torch.float32 else "16"
    arch = _arch(hidden.device)
    aligned = _aligned((hidden, weight), hidden.shape[1],
                       _LOGIT_CONFIGS[(arch, bits, True)]["BLOCK_H"])
    # fp32 operands follow torch's own matmul setting: fp32 callers get fp32 GEMMs unless they
    # opted into TF32 for their matmuls too.
    prec = "tf32" if (bits == "16" or tf32_enabled()) else "ieee"
    cfg = {**_gpu_config(arch, bits, aligned), "DOT_F32": False, "PRECISION": prec,
           "ALIGNED": aligned, "RNE_BF16": False}
    cfg.update({k: v for k, v in _CONFIG_OVERRIDE.items() if k != "TMA"})
    return cfg


def _fwd_splits(N: int, V: int, cfg: dict) -> tuple[int, int]:
    """(splits, vocab tiles per split): SPLIT_TILES tiles per split, more splits when N is too
    small to give MIN_PROGRAMS programs. Depends on the shape only, not on the device."""
    n_tiles, v_tiles = triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"])
    splits = max(triton.cdiv(v_tiles, cfg["SPLIT_TILES"]), triton.cdiv(cfg["MIN_PROGRAMS"], n_tiles))
    splits = max(1, min(v_tiles, splits))
    tps = triton.cdiv(v_tiles, splits)
    return triton.cdiv(v_tiles, tps), tps


# Allocation log for tests: (name, bytes) of every workspace buffer, when a list.
_ALLOC_LOG: list | None = None


def _workspace(shape, dtype, device, name: str) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _ALLOC_LOG is not None:
        _ALLOC_LOG.append((name, t.numel() * t.element_size()))
    return t


def _plan(N: int, H: int, V: int, dtype: torch.dtype, cfg: dict, *, has_bias: bool = True,
          need_h: bool = True) -> dict:
    """Slice width and the transient bytes of every buffer forward and backward allocate
    (beyond inputs, outputs and gradients). The launchers allocate exactly these."""
    elem = torch.empty((), dtype=dtype).element_size()
    splits, _ = _fwd_splits(N, V, _fwd_config(cfg))
    saved = 8 * N                                  # lse, entropy: forward -> backward
    # Forward: the partials, and the merge's [SPLITS, N] fp32 temporaries (<= 4 alive at once).
    fwd = {"partials": 16 * splits * N, "merge": 16 * splits * N + 24 * N}
    if cfg.get("TMA") and cfg["TMA"]["SCRATCH"]:   # the descriptors' (GPU; interpreter: none)
        fwd["tma_scratch"] = cfg["TMA"]["SCRATCH"] * cfg["TMA"]["PROGRAMS"]
    bwd = {"grad_copies": 8 * N}                   # fp32 upstream grads
    if need_h and dtype != torch.float32:
        bwd["dh_lo"] = N * H * elem
    if has_bias:
        bwd["db32"] = 4 * V
    q = max(cfg["BLOCK_V"], cfg["DH_BLOCK_K"])
    budget = BWD_WORKSPACE_FRACTION * 4 * N * V
    cols = int(budget - saved - sum(bwd.values())) // max(1, N * elem) // q * q
    v_pad = triton.cdiv(V, q) * q
    cols = min(v_pad, max(cols, min(v_pad, triton.cdiv(cfg["MIN_SLICE"], q) * q)))
    bwd["dz"] = N * cols * elem
    total = saved + max(sum(fwd.values()), sum(bwd.values()))
    return {"slice_cols": cols, "n_slices": triton.cdiv(V, cols), "saved": saved, "fwd": fwd,
            "bwd": bwd, "total": total, "splits": splits}


def fused_linear_logprob_workspace(n_tokens: int, hidden: int, vocab: int,
                                   dtype: torch.dtype = torch.bfloat16, *, bias: bool = False,
                                   arch: int = 90) -> int:
    """Transient device bytes that ``fused_linear_logprob`` (Triton path) uses in forward +
    backward beyond its inputs, outputs and gradients: the saved lse / entropy plus the larger of
    the forward's and the backward's buffers. At the Qwen2.5-VL-7B head (N = 16384, H = 3584,
    V = 152064, bf16) it is <= BWD_WORKSPACE_FRACTION (2%) of the fp32 logits N * V * 4 bytes.
    ``arch``: 80 or 90 (tile tables differ); 16-byte alignment of the rows is assumed when
    ``hidden`` is a multiple of 64 (every real lm_head)."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}; got {dtype}")
    if arch not in (80, 90):
        raise ValueError(f"arch must be 80 or 90; got {arch}")
    if n_tokens < 0 or hidden < 1 or vocab < 1:
        raise ValueError(f"n_tokens must be >= 0 and hidden, vocab >= 1; got {n_tokens}, "
                         f"{hidden}, {vocab}")
    if n_tokens == 0:
        return 0          # an empty batch launches nothing
    bits = "32" if dtype == torch.float32 else "16"
    aligned = hidden % _LOGIT_CONFIGS[(arch, bits, True)]["BLOCK_H"] == 0
    cfg = _gpu_config(arch, bits, aligned)
    return int(_plan(n_tokens, hidden, vocab, dtype, cfg, has_bias=bias)["total"])


def _triton_forward(hidden, weight, bias, targets, inv_temp, logit_round=0, tma=False):
    """(logp, entropy, lse), each [N] fp32, from the fused kernel plus the split merge.
    ``logit_round``: the kernels' LOGIT_ROUND (0 none, 1 bf16, 2 fp16). ``tma``: as
    fused_linear_logprob's (the TMA forward where it applies, else the cp.async one)."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _fwd_config(_config(hidden, weight, tma))
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    splits, tps = _fwd_splits(N, V, cfg)
    part = _workspace((4, splits, N), torch.float32, hidden.device, "partials")
    args = (hidden, weight, bias if bias is not None else hidden, targets, part,
            N, V, H, tps, splits, hidden.stride(0), weight.stride(0), splits * N, inv_temp)
    work = triton.cdiv(N, bn) * splits
    if cfg["TMA"]:
        if not _interpreting(hidden):
            _ensure_allocator()
        if _ALLOC_LOG is not None and cfg["SCRATCH"]:
            _ALLOC_LOG.append(("tma_scratch", cfg["SCRATCH"] * min(work, cfg["PROGRAMS"])))
        # persistent: min(work items, programs) programs walk the work items in raster order
        _linear_logprob_fwd_tma_kernel[(min(work, cfg["PROGRAMS"]),)](
            *args, HAS_BIAS=bias is not None, DOT_F32=cfg["DOT_F32"], PRECISION=cfg["PRECISION"],
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=cfg["BLOCK_H"], GROUP_N=cfg["GROUP_N"],
            LOGIT_ROUND=logit_round, RNE_BF16=cfg["RNE_BF16"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    else:
        _linear_logprob_fwd_kernel[(work,)](
            *args, HAS_BIAS=bias is not None, DOT_F32=cfg["DOT_F32"], PRECISION=cfg["PRECISION"],
            ALIGNED=cfg["ALIGNED"], BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=cfg["BLOCK_H"],
            GROUP_N=cfg["GROUP_N"], LOGIT_ROUND=logit_round, RNE_BF16=cfg["RNE_BF16"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    m, s, t, zt = part.unbind(0)
    # Merge the splits' partials: every m is finite (each split has a valid column).
    mx = m.max(dim=0).values
    a = torch.exp(m - mx)
    s_all = (s * a).sum(0)
    t_all = ((t + s * (m - mx)) * a).sum(0)
    log_s = torch.log(s_all)
    lse = mx + log_s
    ent = log_s - t_all / s_all
    logp = zt.sum(0) - lse      # exactly one split holds the target column; the others add 0
    return logp, ent, lse


def _mm_into(a, b, out):
    """out = a @ b with fp32 accumulation, written in out's dtype (which may be fp32 while the
    operands are 16-bit: the gradients of an autocast lm_head's fp32 inputs, as TRL forms them)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and a.is_cuda and _MM_OUT_DTYPE:
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        out.copy_(torch.mm(a.float(), b.float()))


def _triton_backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, inv_temp, needs,
                     logit_round=0, grad_dtypes=None):
    """(dhidden, dweight, dbias), one vocabulary slice at a time (see the module docstring).
    ``grad_dtypes``: the gradients' dtypes (default the operands'); fp32 ones for 16-bit
    operands are accumulated in fp32 (dH in one fp32 plane instead of hi + lo)."""
    need_h, need_w, need_b = needs
    N, H = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    hd, wd, bd = grad_dtypes or (dt, weight.dtype, bias.dtype if bias is not None else None)
    dh_dt = hd if hd in (dt, torch.float32) else torch.float32   # the dH kernel's plane
    compensated = dh_dt != torch.float32
    cfg = _config(hidden, weight)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    plan = _plan(N, H, V, dt, cfg, has_bias=need_b, need_h=need_h and compensated)
    vs = plan["slice_cols"]

    g_logp = g_logp.float().contiguous() if g_logp is not None else None
    g_ent = g_ent.float().contiguous() if g_ent is not None else None
    if _ALLOC_LOG is not None:
        _ALLOC_LOG.append(("grad_copies", 8 * N))
    dz_buf = _workspace((N, vs), dt, dev, "dz")     # vs: a multiple of 32 columns, rows 16 B
    dh = torch.empty(N, H, device=dev, dtype=dh_dt) if need_h else None
    lo = _workspace((N, H), dt, dev, "dh_lo") if need_h and compensated else None
    dw = torch.empty(V, H, device=dev, dtype=wd) if need_w else None
    db32 = _workspace((V,), torch.float32, dev, "db32") if need_b else None
    dh_grid = (triton.cdiv(N, cfg["DH_BLOCK_M"]) * triton.cdiv(H, cfg["DH_BLOCK_N"]),)

    for i, v0 in enumerate(range(0, V, vs)):
        cols = min(vs, V - v0)
        dz = dz_buf[:, :cols]
        _linear_logprob_bwd_kernel[(triton.cdiv(N, bn) * triton.cdiv(cols, bv),)](
            hidden, weight, bias if bias is not None else hidden, targets, lse, ent,
            g_logp if g_logp is not None else lse,      # dummies are never read
            g_ent if g_ent is not None else lse,
            dz, N, V, H, v0, cols, hidden.stride(0), weight.stride(0), dz.stride(0), inv_temp,
            HAS_BIAS=bias is not None, HAS_GLOGP=g_logp is not None, HAS_GENT=g_ent is not None,
            DOT_F32=cfg["DOT_F32"], PRECISION=cfg["PRECISION"], ALIGNED=cfg["ALIGNED"],
            LOGIT_ROUND=logit_round, RNE_BF16=cfg["RNE_BF16"],
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=cfg["BLOCK_H"],
            GROUP_N=cfg["GROUP_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if need_w:
            # K = N: each slice of dW is one GEMM, written once, never accumulated.
            _mm_into(dz.t(), hidden, dw[v0:v0 + cols])
        if need_h:
            _linear_logprob_dh_kernel[dh_grid](
                dz, weight, dh, lo if lo is not None else dh, N, H, cols, v0,
                dz.stride(0), weight.stride(0), dh.stride(0),
                FIRST=i == 0, COMPENSATED=compensated, RNE_BF16=cfg["RNE_BF16"],
                DOT_F32=cfg["DOT_F32"], PRECISION=cfg["PRECISION"],
                BLOCK_M=cfg["DH_BLOCK_M"], BLOCK_N=cfg["DH_BLOCK_N"], BLOCK_K=cfg["DH_BLOCK_K"],
                GROUP_M=cfg["GROUP_N"], num_warps=cfg["DH_num_warps"],
                num_stages=cfg["DH_num_stages"],
            )
        if need_b:
            torch.sum(dz, 0, dtype=torch.float32, out=db32[v0:v0 + cols])
    db = db32.to(bd) if need_b else None
    return (dh.to(hd) if need_h else None), dw, db


class _FusedLinearLogprob(torch.autograd.Function):
    """Triton forward (online log-sum-exp over vocab tiles) and recompute-in-backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, logit_dtype=None, tma=False):
        ctx.grad_dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.logit_round = 0
        if logit_dtype is not None:
            # The lm_head as autocast runs it: operands in logit_dtype, fp32 sums rounded to it
            # (in the kernels); the gradients come back in the inputs' own dtypes, accumulated
            # in fp32 (TRL's ChunkedLogProbFunction). The cast copies are what is saved.
            hidden, weight = hidden.to(logit_dtype), weight.to(logit_dtype)
            bias = bias.to(logit_dtype) if bias is not None else None
            ctx.logit_round = _LOGIT_ROUND[logit_dtype]
        logp, ent, lse = _triton_forward(hidden, weight, bias, targets, inv_temp, ctx.logit_round, tma)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.inv_temp = inv_temp
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        if torch.is_grad_enabled():
            raise RuntimeError("fused_linear_logprob: double backward (create_graph=True) is not supported: "
                               "the backward kernels are not themselves differentiable")
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2])
        if (g_logp is None and g_ent is None) or not any(needs):
            return None, None, None, None, None, None, None
        dh, dw, db = _triton_backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent,
                                      ctx.inv_temp, needs, ctx.logit_round, ctx.grad_dtypes)
        return dh, dw, db, None, None, None, None


# ---------------------------------------------------------------------------------------------
# public function

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOGIT_ROUND = {torch.bfloat16: 1, torch.float16: 2}   # logit_dtype -> the kernels' LOGIT_ROUND


def _check_inputs(hidden, weight, targets, temperature, bias, backend) -> None:
    if type(weight).__name__ == "DTensor" or type(hidden).__name__ == "DTensor":
        raise ValueError("fused_linear_logprob got a DTensor (an FSDP2/TP shard); gather it first "
                         "(e.g. weight.full_tensor(), which keeps autograd through FSDP)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H]; got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if V < 1 or H < 1:
        raise ValueError(f"weight must have V >= 1 and H >= 1; got [V, H] = [{V}, {H}]")
    if hidden.dim() < 1 or hidden.shape[-1] != H:
        raise ValueError(f"hidden {tuple(hidden.shape)} must end in H = {H} "
                         f"(weight is [V, H] = [{V}, {H}])")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden's leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32; got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if hidden.dtype not in allowed:
        raise ValueError(f"dtype {hidden.dtype} not supported by backend {backend!r}; "
                         f"use one of {[str(d) for d in allowed]}")
    if bias is not None and (tuple(bias.shape) != (V,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float tensor of shape ({V},); got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (hidden, weight, targets) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")


def _check_targets(targets: torch.Tensor, V: int) -> None:
    if targets.numel() == 0:
        return
    if targets.device.type == "cuda" or torch.compiler.is_compiling():
        # (under torch.compile a host read-back would break the graph: checked on the device)
        # No host sync: the assert fires asynchronously (at a later launch) if any target is bad.
        torch._assert_async(((targets >= 0) & (targets < V)).all(),
                            f"fused_linear_logprob: a target is outside [0, {V})")
        return
    bad = (targets < 0) | (targets >= V)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must lie in [0, V={V}); {int(bad.sum())} do not, e.g. "
                         f"targets[{idx}] = {int(targets.reshape(-1)[idx])} "
                         f"(min {int(targets.min())}, max {int(targets.max())})")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch'; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
                         "set before triton is imported (or use backend='torch')")
    return backend


def fused_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         temperature: float = 1.0, bias: torch.Tensor | None = None,
                         return_entropy: bool = False, backend: str = "auto",
                         logit_dtype: torch.dtype | None = None, tma: bool | None = None):
    """Log-probability of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    hidden [..., H] and weight [V, H] share a dtype (bf16, fp16, fp32; fp64 on the torch
    backend); targets [...] int in [0, V). Returns ``logp`` [...] fp32, and ``(logp, entropy)``
    when ``return_entropy``; the entropy is that of the tempered distribution and is
    differentiable. Gradients flow to hidden, weight and bias.

    backend: ``"auto"`` — Triton on CUDA, the chunked PyTorch path on CPU; ``"triton"`` — the
    Triton kernels (on CPU only under TRITON_INTERPRET=1, as the tests do); ``"torch"`` — the
    chunked PyTorch path (any device; peak extra memory one chunk x V, never N x V).

    ``logit_dtype`` (bf16 / fp16, default None): run the lm_head as it runs under autocast —
    operands in that dtype, fp32 accumulation — so that the log-probs match ones computed that way
    (TRL's under ``bf16=True``). Both paths also round the logits to it (after the GEMM and again
    after adding the bias, before the temperature) and the logits' gradient, as TRL's tile does:
    the Triton kernels in their shared logit-tile helper (``_round_logits``), so the forward and
    the backward's recompute agree. Gradients come back in the inputs' dtypes, accumulated in
    fp32 (fp32 inputs under autocast get fp32 gradients, as TRL's).

    ``tma`` (Triton path, forward only): True runs the forward with TMA descriptor loads on a
    persistent grid where that applies (sm_90+, bf16 / fp16, 16-byte aligned bases and row
    strides) and the cp.async forward elsewhere; False always the cp.async forward; None (the
    default) reads STAGED_LOGPROB_TMA ("1" = True), off when unset: the TMA forward compiles for
    sm_90 on triton 3.6 and 3.9 and passes the interpreter tests, but has not run on a GPU yet.
    """
    use_tma = _tma_requested(tma)   # (validates tma)
    if logit_dtype is not None and logit_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"logit_dtype must be None, torch.bfloat16 or torch.float16; got {logit_dtype}")
    _check_inputs(hidden, weight, targets, temperature, bias, backend)
    kind = _resolve_backend(backend, hidden.device)
    if kind == "triton" and hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"the Triton kernels take bf16/fp16/fp32; got {hidden.dtype}")
    V, H = weight.shape
    _check_targets(targets, V)
    lead = targets.shape
    h2 = hidden.reshape(-1, H)
    t1 = targets.reshape(-1)
    # The kernels index with a unit column stride; a transposed view is copied once here.
    if h2.numel() and h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w2 = weight if weight.stride(-1) == 1 else weight.contiguous()
    t1 = t1.contiguous()
    b1 = bias.contiguous() if bias is not None else None

    if h2.shape[0] == 0:
        # Empty batch: keep the graph connected so .backward() on a sum still works.
        zero = (h2.sum() * 0 + w2.sum() * 0).float()
        logp = zero.expand(0).reshape(lead)
        return (logp, logp.clone()) if return_entropy else logp
    if kind == "triton":
        logp, ent = _FusedLinearLogprob.apply(h2, w2, b1, t1, 1.0 / float(temperature), logit_dtype, use_tma)
    else:
        logp, ent = chunked_linear_logprob(h2, w2, t1, temperature=float(temperature), bias=b1,
                                           with_entropy=return_entropy,
                                           logit_dtype=logit_dtype if h2.dtype != torch.float64 else None)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


__all__ = ["fused_linear_logprob", "fused_linear_logprob_workspace", "BWD_WORKSPACE_FRACTION"]
