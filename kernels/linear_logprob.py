"""Fused linear -> log-prob (+ entropy): the log-probability of each sampled token under
``softmax((hidden @ weight.T + bias) / T)``, without materialising [N, V] logits in the forward.

Shapes and dtypes
    hidden  : [N, H]  bf16 / fp16 / fp32   (leading dims [..., H] are flattened by the wrapper)
    weight  : [V, H]  same dtype as hidden (the lm_head; a plain tensor, not an FSDP2 shard)
    bias    : [V]     any float dtype, optional
    targets : [N]     int32 / int64, 0 <= t < V
    out     : logp [N] fp32, entropy [N] fp32 (entropy of softmax(z), z = logits / T)

Design: recompute in backward, 8NHV FLOPs in all, deterministic.
    forward   one kernel, tiles of BLOCK_N tokens x BLOCK_V vocab columns. Each program owns a
              token tile and a contiguous range of vocab tiles (a "split"), computes the logit
              tile z = (h @ W_tile^T + b) / T in fp32 and folds it into an online log-sum-exp
              (running max m, sum s = sum exp(z - m), t = sum exp(z - m) * (z - m), target logit).
              Splits exist so that a small N still fills the GPU; their partials are merged by a
              few [SPLITS, N] torch ops (log-sum-exp of partials; no host sync). Only lse[N] and
              entropy[N] are saved for backward: no [N, V] tensor ever exists in the forward.
    backward  for each chunk of C tokens, one kernel recomputes the logit tiles and writes
              dlogits[C, V] (in the input dtype) with the softmax / entropy gradient fused in its
              epilogue; then cuBLAS does dH[chunk] = dlogits @ W and dW += dlogits^T @ h[chunk].
              Peak extra memory is C x V (C from BWD_CHUNK_BYTES) plus, when there is more than
              one chunk and W is bf16/fp16, an fp32 dW accumulator and a chunk's dW, V x H x 6 B.
    Why not a fully fused backward: dH [BLOCK_N, H] and dW [BLOCK_V, H] accumulators do not fit in
    registers at H = 3584, and keeping them in global memory (read-modify-write or atomics per
    [BLOCK_N, BLOCK_V] tile) moves 8 * (BLOCK_N + BLOCK_V) * H bytes per 4 * BLOCK_N * BLOCK_V * H
    FLOPs, ~21 FLOP/byte at 64 x 128 tiles: HBM-bound at a tenth of tensor-core speed. Atomics
    would also make dW non-deterministic. A chunk of dlogits costs 3 * C * V * elem bytes for
    6 * C * H * V FLOPs (2 * H FLOP/byte = 7168 at H = 3584): compute-bound, and deterministic.

Gradients (z = logits / T, p = softmax(z), lse = logsumexp(z), ent = lse - sum_j p_j z_j):
    d logp / d z_j = onehot_j - p_j
    d ent  / d z_j = -p_j (z_j - sum_k p_k z_k) = -p_j (log p_j + ent)
    dlogits = (g_logp * (onehot - p) - g_ent * p * (log p + ent)) / T;   db = sum_n dlogits

FLOP / byte model (elem = bytes per input element; the benchmark reports TFLOP/s from this)
    forward : 2 N H V (logit GEMM) + ~8 N V (exp, max, sums).  Bytes from HBM at best
              (N H + V H) elem + 4 N * 4; the kernel streams W once per token tile, so
              ceil(N / BLOCK_N) * V * H * elem bytes go through L2 (neighbouring programs share W
              tiles: the token tile is the fastest grid axis).
    backward: 6 N H V (recompute 2NHV, dH 2NHV, dW 2NHV) + ~10 N V. Bytes: W and h read by each
              of the three GEMMs, dlogits written once and read twice (3 N V elem), and with
              k = ceil(N / C) > 1 chunks a dW accumulator pass of k * V * H * (elem + 8) bytes.
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
from staged.kernels.linear_logprob_chunked import chunked_linear_logprob

# Peak bytes of the dlogits chunk the backward materialises (C x V x elem). 512 MiB at
# V = 152064 bf16 is C = 1765 tokens: big enough that the three GEMMs run at full speed and the
# fp32 dW accumulator pass is a small fraction of them (see the byte model above).
BWD_CHUNK_BYTES = int(os.environ.get("STAGED_LOGPROB_CHUNK_MB", "512")) * 2**20

# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _logit_tile(h_rows, w_cols, b_ptr, offs_v, mask_n, mask_v, H,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                ALIGNED: tl.constexpr):
    """One [BLOCK_N, BLOCK_V] tile of hidden @ weight^T (+ bias) in fp32: the forward computes
    it and the backward recomputes it, so both must run exactly this loop."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        hp = h_rows + offs_k[None, :]
        wp = w_cols + offs_k[:, None]
        if ALIGNED:
            # The launcher checked: H % BLOCK_H == 0 (no K mask), 16-byte aligned rows and
            # bases. The hint is what the JIT infers by itself from aligned arguments; it
            # makes the ahead-of-time compile see the same vectorised, pipelined loads.
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
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc


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
    stride_hn, stride_wv,
    stride_part,      # SPLITS * N: distance between the four partial planes
    inv_temp,         # 1 / temperature
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,     # upcast dot operands to fp32 (interpreter: its bf16 dot is wrong)
    PRECISION: tl.constexpr,   # tl.dot input_precision for fp32 operands ("ieee" or "tf32")
    ALIGNED: tl.constexpr,     # H % BLOCK_H == 0 and 16-byte aligned rows: unmasked K loads
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)   # token tile: fastest axis, so concurrent programs share W tiles
    pid_s = tl.program_id(1)   # vocab split
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn      # int64: N*H may pass 2^31

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)      # sum exp(z - m) (z - m): entropy without cancelling
    zt = tl.zeros([BLOCK_N], tl.float32)

    v_lo = pid_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)   # every split starts inside V
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
        acc = _logit_tile(h_rows, w_cols, b_ptr, offs_v, mask_n, mask_v, H, BLOCK_N, BLOCK_V, BLOCK_H,
                          HAS_BIAS, DOT_F32, PRECISION, ALIGNED)
        z = tl.where(mask_v[None, :], acc * inv_temp, float("-inf"))

        m_new = tl.maximum(m, tl.max(z, axis=1))           # finite: the tile has a valid column
        alpha = tl.exp(m - m_new)                           # 0 on the first tile (m = -inf)
        d = tl.where(mask_v[None, :], z - m_new[:, None], 0.0)
        e = tl.where(mask_v[None, :], tl.exp(d), 0.0)
        # t is relative to the running max: shifting m_old -> m_new adds s * (m_old - m_new).
        # (m_old is -inf before the first tile, where s = 0: use a shift of 0, not 0 * -inf.)
        m_old = tl.where(s > 0, m, m_new)
        t = alpha * (t + s * (m_old - m_new)) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)

    out = part_ptr + pid_s * N + offs_n
    tl.store(out, m, mask=mask_n)
    tl.store(out + stride_part, s, mask=mask_n)
    tl.store(out + 2 * stride_part, t, mask=mask_n)
    tl.store(out + 3 * stride_part, zt, mask=mask_n)


@triton.jit
def _linear_logprob_bwd_kernel(
    # pointers (all offset to the first row of the chunk)
    h_ptr,          # [C, H] hidden rows of the chunk
    w_ptr,          # [V, H] weight
    b_ptr,          # [V] bias (never read when HAS_BIAS is False)
    tgt_ptr,        # [C] targets
    lse_ptr,        # [C] fp32 log-sum-exp of z saved by the forward
    ent_ptr,        # [C] fp32 entropy saved by the forward (read only when HAS_GENT)
    glogp_ptr,      # [C] fp32 upstream grad of logp (read only when HAS_GLOGP)
    gent_ptr,       # [C] fp32 upstream grad of entropy (read only when HAS_GENT)
    dz_ptr,         # [C, V] out: dlogits in the input dtype, row stride stride_dzn
    # sizes
    C, V, H,
    stride_hn, stride_wv, stride_dzn,
    inv_temp,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,   # token tiles that walk the vocab together (L2 reuse of W tiles)
):
    # Grouped ordering, as in Triton's matmul tutorial: GROUP_N token tiles sweep the vocab
    # side by side, so each W tile is fetched from HBM once per group, not once per token tile.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(C, BLOCK_N)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_pid_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < C
    mask_v = offs_v < V
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv

    acc = _logit_tile(h_rows, w_cols, b_ptr, offs_v, mask_n, mask_v, H, BLOCK_N, BLOCK_V, BLOCK_H,
                      HAS_BIAS, DOT_F32, PRECISION, ALIGNED)   # the forward's tile, recomputed

    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    # log p_j; rows past C are zeroed so that their (unstored) lanes never overflow exp.
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
    out = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dzn + offs_v[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


# ---------------------------------------------------------------------------------------------
# GPU launch configurations, and their ahead-of-time registration (the same table feeds both)

# (operand dtype, aligned) -> tiles, warps, stages. "aligned": H % BLOCK_H == 0, 16-byte aligned
# base pointers and row strides — every real lm_head (H = 896 ... 8192). The unaligned variant
# (odd H such as 59, or a misaligned view) masks K and cannot use vectorised async copies, so it
# keeps its loads in registers: smaller K tiles and no pipelining keep it from spilling. fp32
# ("ieee" dots run on the FMA units, operands in registers) uses 64 x 64 tiles for the same reason.
_GPU_CONFIGS = {
    ("16", True): {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
    ("32", True): {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3},
    ("16", False): {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 1},
    ("32", False): {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 16, "num_warps": 8, "num_stages": 1},
}
_BWD_GROUP_N = 8

_FWD_SIG = {
    "h_ptr": "*{t}", "w_ptr": "*{t}", "b_ptr": "*{t}", "tgt_ptr": "*i64", "part_ptr": "*fp32",
    "N": "i32", "V": "i32", "H": "i32", "tiles_per_split": "i32",
    "stride_hn": "i32", "stride_wv": "i32", "stride_part": "i32", "inv_temp": "fp32",
}
_BWD_SIG = {
    "h_ptr": "*{t}", "w_ptr": "*{t}", "b_ptr": "*{t}", "tgt_ptr": "*i64",
    "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32",
    "dz_ptr": "*{t}", "C": "i32", "V": "i32", "H": "i32",
    "stride_hn": "i32", "stride_wv": "i32", "stride_dzn": "i32", "inv_temp": "fp32",
}


def _register_all() -> None:
    for (bits, aligned), cfg in _GPU_CONFIGS.items():
        t, prec = ("bf16", "tf32") if bits == "16" else ("fp32", "ieee")
        blocks = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}
        common = {"DOT_F32": False, "PRECISION": prec, "ALIGNED": aligned, **blocks}
        tag = f"{t},{'aligned' if aligned else 'unaligned'}"
        launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        fwd_sig = {k: v.format(t=t) for k, v in _FWD_SIG.items()}
        bwd_sig = {k: v.format(t=t) for k, v in _BWD_SIG.items()}
        for bias in (False, True):
            register_aot(_linear_logprob_fwd_kernel, fwd_sig, {"HAS_BIAS": bias, **common},
                         name=f"_linear_logprob_fwd_kernel[{tag},bias={int(bias)}]", **launch)
        # logp only (plain GRPO), logp + entropy (entropy bonus / metrics), entropy only.
        for bias, gl, ge in ((False, True, False), (False, True, True), (True, True, True),
                             (False, False, True)):
            register_aot(_linear_logprob_bwd_kernel, bwd_sig,
                         {"HAS_BIAS": bias, "HAS_GLOGP": gl, "HAS_GENT": ge,
                          "GROUP_N": _BWD_GROUP_N, **common},
                         name=f"_linear_logprob_bwd_kernel[{tag},bias={int(bias)},"
                              f"logp={int(gl)},ent={int(ge)}]", **launch)


_register_all()


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


# Tests may override (e.g. GPU-sized tiles under the interpreter): dict merged into the config.
_CONFIG_OVERRIDE: dict = {}


def _config(hidden: torch.Tensor, weight: torch.Tensor) -> dict:
    """Tiles, warps, stages and dot flags for this launch (the backward's per-chunk views of
    hidden keep the alignment of hidden: chunks start at multiples of BLOCK_N rows)."""
    if _interpreting(hidden):
        # Small tiles, so that tests at interpreter-friendly sizes cross many tile edges. The
        # interpreter's bf16 tl.dot multiplies the raw uint16 storage (triton 3.9), so operands
        # are upcast to fp32: the same products, exact in fp32, that the tensor cores form.
        cfg = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 1,
               "DOT_F32": True, "PRECISION": "ieee"}
        cfg.update(_CONFIG_OVERRIDE)
        cfg["ALIGNED"] = _aligned((hidden, weight), hidden.shape[1], cfg["BLOCK_H"])
        return cfg
    bits = "32" if hidden.dtype == torch.float32 else "16"
    aligned = _aligned((hidden, weight), hidden.shape[1], _GPU_CONFIGS[(bits, True)]["BLOCK_H"])
    # fp32 operands follow torch's own matmul setting: fp32 callers get fp32 GEMMs unless they
    # opted into TF32 for their matmuls too.
    prec = "tf32" if (bits == "16" or torch.backends.cuda.matmul.allow_tf32) else "ieee"
    cfg = {**_GPU_CONFIGS[(bits, aligned)], "DOT_F32": False, "PRECISION": prec,
           "ALIGNED": aligned}
    cfg.update(_CONFIG_OVERRIDE)
    return cfg


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4   # interpreter: a pretend 4-SM machine, so that small tests exercise vocab splits


def _triton_forward(hidden, weight, bias, targets, inv_temp):
    """(logp, entropy, lse), each [N] fp32, from the fused kernel plus the split merge."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _config(hidden, weight)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_tiles, v_tiles = triton.cdiv(N, bn), triton.cdiv(V, bv)
    # Enough programs for ~4 waves; every split owns >= 1 vocab tile.
    splits = max(1, min(v_tiles, triton.cdiv(4 * _num_sms(hidden.device), n_tiles)))
    tps = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tps)
    part = torch.empty(4, splits, N, device=hidden.device, dtype=torch.float32)
    _linear_logprob_fwd_kernel[(n_tiles, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, part,
        N, V, H, tps, hidden.stride(0), weight.stride(0), splits * N, inv_temp,
        HAS_BIAS=bias is not None, DOT_F32=cfg["DOT_F32"], PRECISION=cfg["PRECISION"],
        ALIGNED=cfg["ALIGNED"], BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=cfg["BLOCK_H"],
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


def _bwd_chunk_rows(N: int, V: int, elem: int, block_n: int) -> int:
    rows = BWD_CHUNK_BYTES // max(1, V * elem)
    rows = max(block_n, rows // block_n * block_n)
    return min(N, rows)


def _triton_backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, inv_temp, needs):
    """(dhidden, dweight, dbias) by chunks of tokens: dlogits from the kernel, GEMMs by torch."""
    need_h, need_w, need_b = needs
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _config(hidden, weight)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    dt = hidden.dtype
    elem = hidden.element_size()
    chunk = _bwd_chunk_rows(N, V, elem, bn)
    # Row stride padded to 16 bytes so cuBLAS sees aligned rows even for odd V. Under the
    # interpreter the kernel writes fp32 and torch rounds: the interpreter's fp32 -> bf16 cast
    # truncates, where the GPU's rounds to nearest even.
    dz_dt = torch.float32 if _interpreting(hidden) else dt
    pad = 16 // elem
    dz_buf = torch.empty(chunk, triton.cdiv(V, pad) * pad, device=hidden.device, dtype=dz_dt)
    n_chunks = triton.cdiv(N, chunk)

    dh = torch.empty(N, H, device=hidden.device, dtype=dt) if need_h else None
    dw = dw32 = dw_part = None
    if need_w and n_chunks > 1:
        if dt == torch.float32:
            dw = torch.zeros(V, H, device=hidden.device, dtype=dt)
        else:
            # Accumulate the chunks' dW in fp32 (k bf16 partial sums would each round): one
            # [V, H] fp32 accumulator plus one [V, H] buffer for each chunk's GEMM output.
            dw32 = torch.zeros(V, H, device=hidden.device, dtype=torch.float32)
            dw_part = torch.empty(V, H, device=hidden.device, dtype=dt)
    db32 = torch.zeros(V, device=hidden.device, dtype=torch.float32) if need_b else None

    g_logp = g_logp.float().contiguous() if g_logp is not None else None
    g_ent = g_ent.float().contiguous() if g_ent is not None else None
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        c = n1 - n0
        h_c = hidden[n0:n1]
        dz = dz_buf[:c, :V]
        grid = (triton.cdiv(c, bn) * triton.cdiv(V, bv),)
        _linear_logprob_bwd_kernel[grid](
            h_c, weight, bias if bias is not None else hidden, targets[n0:n1],
            lse[n0:n1], ent[n0:n1],
            g_logp[n0:n1] if g_logp is not None else lse,      # dummies are never read
            g_ent[n0:n1] if g_ent is not None else lse,
            dz, c, V, H, h_c.stride(0), weight.stride(0), dz.stride(0), inv_temp,
            HAS_BIAS=bias is not None, HAS_GLOGP=g_logp is not None, HAS_GENT=g_ent is not None,
            DOT_F32=cfg["DOT_F32"], PRECISION=cfg["PRECISION"], ALIGNED=cfg["ALIGNED"],
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=cfg["BLOCK_H"], GROUP_N=_BWD_GROUP_N,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        dz = dz.to(dt)
        if need_h:
            torch.mm(dz, weight, out=dh[n0:n1])
        if need_w:
            if n_chunks == 1:
                dw = torch.mm(dz.t(), h_c)
            elif dw32 is None:
                dw.addmm_(dz.t(), h_c)
            else:
                dw32.add_(torch.mm(dz.t(), h_c, out=dw_part))
        if need_b:
            db32 += dz.sum(0, dtype=torch.float32)
    if dw32 is not None:
        dw = dw32.to(weight.dtype)
    db = db32.to(bias.dtype) if need_b else None
    return dh, dw, db


class _FusedLinearLogprob(torch.autograd.Function):
    """Triton forward (online log-sum-exp over vocab tiles) and recompute-in-backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp):
        logp, ent, lse = _triton_forward(hidden, weight, bias, targets, inv_temp)
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
            return None, None, None, None, None
        dh, dw, db = _triton_backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent,
                                      ctx.inv_temp, needs)
        return dh, dw, db, None, None


# ---------------------------------------------------------------------------------------------
# public function

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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
                         logit_dtype: torch.dtype | None = None):
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
    (TRL's under ``bf16=True``). The torch path also rounds the logits and the logits' gradient to
    it, as TRL's does; the Triton path keeps its fp32 logit tile. Gradients come back in the
    inputs' dtypes.
    """
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
        if logit_dtype is not None:
            h2, w2 = h2.to(logit_dtype), w2.to(logit_dtype)
            b1 = b1.to(logit_dtype) if b1 is not None else None
        logp, ent = _FusedLinearLogprob.apply(h2, w2, b1, t1, 1.0 / float(temperature))
    else:
        logp, ent = chunked_linear_logprob(h2, w2, t1, temperature=float(temperature), bias=b1,
                                           with_entropy=return_entropy,
                                           logit_dtype=logit_dtype if h2.dtype != torch.float64 else None)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


__all__ = ["fused_linear_logprob", "BWD_CHUNK_BYTES"]
