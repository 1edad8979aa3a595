"""Decode attention over the paged KV cache: one query token per row, the keys / values read in
place from the block pool through the row's block table (no gather, no padding to the longest
row, no mask).

One program per (row, kv head, split) holds the row's GROUP query heads that share the kv head
(GQA) as a [GROUP_PAD, D] tile and walks its split's tokens BLOCK_N at a time -- each token's
address from its block id (table[t // block_size]) and offset (t % block_size), so BLOCK_N does
not have to match the cache's block size -- with the online softmax (running max and sum in
fp32, the weighted sum of V in fp32). Work and bytes follow each row's own length.

Split-KV (flash-decoding): a row of n tokens has ceil(n / SPLIT) splits of SPLIT tokens, so a few
long rows still fill the GPU (one program per row and kv head would leave most SMs idle). A row
with one split finishes in its program, a single pass as before; a longer row's splits write
their unnormalised partials (acc, running max, running sum) to an fp32 workspace and a second
kernel merges them. The grid's third side is the splits of the longest row the block table can
hold (static under CUDA graphs: no host read of the lengths); a row's splits past its own count
return at once, and the combine kernel is launched only when the table can hold a second split.

Batch invariance by construction: a split's bounds are its row's length and the fixed SPLIT and
BLOCK_N, its walk's order is fixed, and the combine merges a row's splits in the order 0..n-1
(the max first, exact in any order, then the weighted sums); nothing depends on the batch, the
table's width or the grid. So a row's output is the same bits whatever rows share the launch,
whatever their lengths, and however wide the block table is. A row of at most SPLIT tokens takes
the same single pass whatever SPLIT is.
(The torch path gets there on a CPU by one SDPA call per row length; on CUDA it pads and masks.)

Decode attention is a read of the row's K/V: it is bandwidth-bound, so the tile shapes are set
for a full tensor-core dot (GROUP padded to 16) and wide enough loads, not for arithmetic.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from staged.kernels.aot import register_aot
from staged.kernels.device import tf32_enabled

# Keys per step of a row's walk: part of the row's summation order, so fixed (never a function of
# the batch). With the strides divisible by 16 as they are at real launches (the AOT entries say
# so), the K/V loads are 16-byte cp.async ones, pipelined over NUM_STAGES steps.
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
# Tokens per split of a long row (flash-decoding): 8 key steps, enough for the 3-stage pipeline to
# run full; the split's partials (GROUP x D fp32 and m, l: 3.5 KiB at the 7B layout), written once
# and read once by the combine, are < 3% of the 256 KiB of bf16 K and V it reads at head_dim 128.
# An 8k row gets 16 splits: 8 such rows at 4 kv heads make 512 programs instead of 32. Never sized
# from the batch or the GPU: the split is part of a row's summation order.
SPLIT = 512
ONE_PASS = 1 << 30   # split=None: a split longer than any row


@triton.jit(do_not_specialize=["stride_ts"])  # the table's width changes step to step without graphs
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, seqlens_ptr,
    acc_ptr, ml_ptr,                       # the splits' partials (fp32), read by the combine
    scale,
    stride_qs, stride_qh,                  # q [S, H, D], D contiguous
    stride_kb, stride_kt, stride_kh,       # pools [blocks, block_size, kv_heads, D], D contiguous
    stride_os, stride_oh,                  # out [S, H, D]
    stride_ts,                             # table [S, MB] int32
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,                   # tokens per split: a multiple of BLOCK_N
    DOT_F32: tl.constexpr,                 # interpreter: dots in fp32 (its bf16 dot is not one)
    PRECISION: tl.constexpr,               # tl.dot input_precision for fp32 operands
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(seqlens_ptr + row)
    lo = split * SPLIT
    if lo >= length:  # the grid has splits for the widest table; a shorter row's extra ones stop here
        return
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < GROUP
    dmask = d < D
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    n = tl.arange(0, BLOCK_N)
    table = table_ptr + row.to(tl.int64) * stride_ts
    # SPLIT is a multiple of BLOCK_N, so a step never crosses into the next split: `tok <
    # length` is the only mask, as in a single pass
    for start in range(lo, tl.minimum(lo + SPLIT, length), BLOCK_N):
        tok = start + n
        live = tok < length
        block = tl.load(table + tok // CACHE_BLOCK, mask=live, other=0).to(tl.int64)
        at = block * stride_kb + (tok % CACHE_BLOCK).to(tl.int64) * stride_kt + kvh * stride_kh
        kv_mask = live[:, None] & dmask[None, :]
        k = tl.load(k_ptr + at[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + at[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale          # [GROUP_PAD, BLOCK_N]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if length <= SPLIT:  # the row's only split: the whole single pass, finished here
        out = acc / l_i[:, None]
        tl.store(out_ptr + row.to(tl.int64) * stride_os + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:  # unnormalised: the combine weighs each split by exp(m - max m) once
        part = (row.to(tl.int64) * tl.num_programs(1) + kvh) * tl.num_programs(2) + split
        tl.store(acc_ptr + part * (GROUP * D) + g[:, None] * D + d[None, :], acc,
                 mask=gmask[:, None] & dmask[None, :])
        tl.store(ml_ptr + part * (2 * GROUP) + g, m_i, mask=gmask)
        tl.store(ml_ptr + part * (2 * GROUP) + GROUP + g, l_i, mask=gmask)


@triton.jit(do_not_specialize=["max_splits"])  # set by the table's width, like stride_ts
def _combine_splits_kernel(
    out_ptr, seqlens_ptr, acc_ptr, ml_ptr,
    stride_os, stride_oh,                  # out [S, H, D]
    max_splits,                            # the attention grid's third side (the partials' layout)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    SPLIT: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    length = tl.load(seqlens_ptr + row)
    splits = tl.cdiv(length, SPLIT)
    if splits <= 1:  # finished by the attention kernel
        return
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < GROUP
    dmask = d < D
    first = (row.to(tl.int64) * tl.num_programs(1) + kvh) * max_splits
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    for j in range(0, splits):  # the max is exact in any order; the sums below are not
        m = tl.maximum(m, tl.load(ml_ptr + (first + j) * (2 * GROUP) + g, mask=gmask, other=0.0))
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for j in range(0, splits):  # splits 0, 1, ..., n-1: the row's own fixed order
        ml = ml_ptr + (first + j) * (2 * GROUP)
        w = tl.exp(tl.load(ml + g, mask=gmask, other=0.0) - m)
        l_sum += w * tl.load(ml + GROUP + g, mask=gmask, other=1.0)   # padded heads: not 0 / 0
        part = tl.load(acc_ptr + (first + j) * (GROUP * D) + g[:, None] * D + d[None, :],
                       mask=gmask[:, None] & dmask[None, :], other=0.0)
        acc += w[:, None] * part
    out = acc / l_sum[:, None]
    heads = kvh * GROUP + g
    tl.store(out_ptr + row.to(tl.int64) * stride_os + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def _pad16(n: int) -> int:
    """tl.dot's operand sides are >= 16 and powers of two."""
    return max(16, triton.next_power_of_2(n))


# One entry per layout a bf16 Qwen-VL rollout launches with: head_dim 128 (every released
# Qwen2/2.5/3-VL) and 64; a cache block of 16 (the engine's default without flash-attn) or 256.
# The GQA group only sets masks within the 16-row tile (any group up to 16 compiles alike).
# Every stride but the table's is a multiple of head_dim (64 / 128), and the partials' pointers
# are fresh allocations: the JIT marks them divisible by 16 at a real launch, so the gate does too.
# Registers (ptxas -v): the partials' stores cost the d128 / block-16 entry 168 registers under
# triton 3.6 (3 blocks per SM instead of 4; 128 without them, and 128 under triton 3.9).
for _d in (64, 128):
    for _cb in (16, 256):
        register_aot(_paged_decode_kernel,
                     {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
                      "table_ptr": "*i32", "seqlens_ptr": "*i32", "acc_ptr": "*fp32", "ml_ptr": "*fp32",
                      "scale": "fp32",
                      "stride_qs": "i32", "stride_qh": "i32", "stride_kb": "i32", "stride_kt": "i32",
                      "stride_kh": "i32", "stride_os": "i32", "stride_oh": "i32", "stride_ts": "i32"},
                     {"GROUP": 7, "GROUP_PAD": 16, "D": _d, "D_PAD": _d, "CACHE_BLOCK": _cb,
                      "BLOCK_N": BLOCK_N, "SPLIT": SPLIT, "DOT_F32": False, "PRECISION": "tf32"},
                     num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                     name=f"_paged_decode_kernel[bf16,d{_d},block{_cb}]",
                     divisible=("q_ptr", "k_ptr", "v_ptr", "out_ptr", "table_ptr", "seqlens_ptr",
                                "acc_ptr", "ml_ptr", "stride_qs", "stride_qh", "stride_kb",
                                "stride_kt", "stride_kh", "stride_os", "stride_oh"))
    register_aot(_combine_splits_kernel,
                 {"out_ptr": "*bf16", "seqlens_ptr": "*i32", "acc_ptr": "*fp32", "ml_ptr": "*fp32",
                  "stride_os": "i32", "stride_oh": "i32", "max_splits": "i32"},
                 {"GROUP": 7, "GROUP_PAD": 16, "D": _d, "D_PAD": _d, "SPLIT": SPLIT},
                 num_warps=NUM_WARPS, num_stages=1, name=f"_combine_splits_kernel[bf16,d{_d}]",
                 divisible=("out_ptr", "seqlens_ptr", "acc_ptr", "ml_ptr", "stride_os", "stride_oh"))


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1"


def paged_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           block_table: torch.Tensor, seqlens: torch.Tensor, scale: float,
                           split: int | None = SPLIT) -> torch.Tensor:
    """Attention of one query token per row over its cached keys / values.

    query [S, H, D]; keys, values [num_blocks, block_size, kv_heads, D] (the pool; H a multiple of
    kv_heads); block_table [S, MB] int32 (entries past a row's length are never read);
    seqlens [S] int32 (each row's token count, its new token's included, >= 1). Returns [S, H, D]
    in the query's dtype. ``split``: tokens per split (a multiple of BLOCK_N; None: one pass per
    row, for benchmarks and tests). No host syncs (capturable in a CUDA graph)."""
    S, H, D = query.shape
    _, cache_block, kv_heads, Dk = keys.shape
    if Dk != D or H % kv_heads or values.shape != keys.shape:
        raise ValueError(f"paged_decode_attention: query {tuple(query.shape)} vs keys {tuple(keys.shape)} / "
                         f"values {tuple(values.shape)}")
    if query.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride() != keys.stride():
        raise ValueError("paged_decode_attention: head_dim must be contiguous, keys and values laid out alike")
    split = ONE_PASS if split is None else split
    if not 0 < split <= ONE_PASS or split % BLOCK_N:
        raise ValueError(f"paged_decode_attention: split {split} is not a positive multiple of {BLOCK_N}")
    out = torch.empty_like(query)
    if S == 0:
        return out
    group = H // kv_heads
    # Splits for the longest row the table can hold: a static shape (the table's width is fixed
    # under CUDA graphs), never the lengths, which only the device reads.
    max_splits = triton.cdiv(block_table.shape[1] * cache_block, split)
    parts = S * kv_heads * max_splits if max_splits > 1 else 1   # no partials without a second split
    acc = torch.empty(parts * group * D, dtype=torch.float32, device=query.device)
    ml = torch.empty(parts * 2 * group, dtype=torch.float32, device=query.device)
    interp = _interpreting(query)
    precision = dot_precision(query.dtype, interp)
    _paged_decode_kernel[(S, kv_heads, max_splits)](
        query, keys, values, out, block_table, seqlens, acc, ml, float(scale),
        query.stride(0), query.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(1),
        block_table.stride(0),
        GROUP=group, GROUP_PAD=_pad16(group), D=D, D_PAD=_pad16(D),
        CACHE_BLOCK=cache_block, BLOCK_N=BLOCK_N, SPLIT=split,
        DOT_F32=interp, PRECISION="ieee" if interp else precision,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if max_splits > 1:
        _combine_splits_kernel[(S, kv_heads)](
            out, seqlens, acc, ml, out.stride(0), out.stride(1), max_splits,
            GROUP=group, GROUP_PAD=_pad16(group), D=D, D_PAD=_pad16(D), SPLIT=split,
            num_warps=NUM_WARPS, num_stages=1,
        )
    return out


def dot_precision(dtype: torch.dtype, interp: bool = False) -> str:
    """The kernel's tl.dot input precision: fp32 caches follow torch's matmul setting (fp32 callers
    get fp32 dots unless they opted into TF32), half caches are tensor-core dots anyway."""
    if interp or (dtype == torch.float32 and not tf32_enabled()):
        return "ieee"
    return "tf32"
