"""Decode attention over the paged KV cache: one query token per row, the keys / values read in
place from the block pool through the row's block table (no gather, no padding to the longest
row, no mask).

One program per (row, kv head) holds the row's GROUP query heads that share the kv head (GQA)
as a [GROUP_PAD, D] tile and walks the row's own tokens BLOCK_N at a time -- each token's
address from its block id (table[t // block_size]) and offset (t % block_size), so BLOCK_N does
not have to match the cache's block size -- with the online softmax (running max and sum in
fp32, the weighted sum of V in fp32). Work and bytes follow each row's own length.

Batch invariance by construction: a row's loop bounds are its own length and the fixed BLOCK_N,
its order is fixed, and nothing is split across programs, so its output is the same bits
whatever rows share the launch, whatever their lengths, and however wide the block table is.
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

# Keys per step of a row's walk: part of the row's summation order, so fixed (never a function of
# the batch). With the strides divisible by 16 as they are at real launches (the AOT entries say
# so), the K/V loads are 16-byte cp.async ones, pipelined over NUM_STAGES steps.
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3


@triton.jit(do_not_specialize=["stride_ts"])  # the table's width changes step to step without graphs
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, seqlens_ptr,
    scale,
    stride_qs, stride_qh,                  # q [S, H, D], D contiguous
    stride_kb, stride_kt, stride_kh,       # pools [blocks, block_size, kv_heads, D], D contiguous
    stride_os, stride_oh,                  # out [S, H, D]
    stride_ts,                             # table [S, MB] int32
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,                 # interpreter: dots in fp32 (its bf16 dot is not one)
    PRECISION: tl.constexpr,               # tl.dot input_precision for fp32 operands
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    length = tl.load(seqlens_ptr + row)
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
    for start in range(0, length, BLOCK_N):
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
    out = acc / l_i[:, None]
    tl.store(out_ptr + row.to(tl.int64) * stride_os + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def _pad16(n: int) -> int:
    """tl.dot's operand sides are >= 16 and powers of two."""
    return max(16, triton.next_power_of_2(n))


# One entry per layout a bf16 Qwen-VL rollout launches with: head_dim 128 (every released
# Qwen2/2.5/3-VL) and 64; a cache block of 16 (the engine's default without flash-attn) or 256.
# The GQA group only sets masks within the 16-row tile (any group up to 16 compiles alike).
for _d in (64, 128):
    for _cb in (16, 256):
        register_aot(_paged_decode_kernel,
                     {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
                      "table_ptr": "*i32", "seqlens_ptr": "*i32", "scale": "fp32",
                      "stride_qs": "i32", "stride_qh": "i32", "stride_kb": "i32", "stride_kt": "i32",
                      "stride_kh": "i32", "stride_os": "i32", "stride_oh": "i32", "stride_ts": "i32"},
                     {"GROUP": 7, "GROUP_PAD": 16, "D": _d, "D_PAD": _d, "CACHE_BLOCK": _cb,
                      "BLOCK_N": BLOCK_N, "DOT_F32": False, "PRECISION": "tf32"},
                     num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                     name=f"_paged_decode_kernel[bf16,d{_d},block{_cb}]",
                     # every stride but the table's is a multiple of head_dim (64 / 128): the JIT
                     # marks them divisible by 16 at a real launch, so the gate does too
                     divisible=("q_ptr", "k_ptr", "v_ptr", "out_ptr", "table_ptr", "seqlens_ptr",
                                "stride_qs", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
                                "stride_os", "stride_oh"))


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1"


def paged_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           block_table: torch.Tensor, seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query token per row over its cached keys / values.

    query [S, H, D]; keys, values [num_blocks, block_size, kv_heads, D] (the pool; H a multiple of
    kv_heads); block_table [S, MB] int32 (entries past a row's length are never read);
    seqlens [S] int32 (each row's token count, its new token's included, >= 1). Returns [S, H, D]
    in the query's dtype. No host syncs (capturable in a CUDA graph)."""
    S, H, D = query.shape
    _, cache_block, kv_heads, Dk = keys.shape
    if Dk != D or H % kv_heads or values.shape != keys.shape:
        raise ValueError(f"paged_decode_attention: query {tuple(query.shape)} vs keys {tuple(keys.shape)} / "
                         f"values {tuple(values.shape)}")
    if query.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride() != keys.stride():
        raise ValueError("paged_decode_attention: head_dim must be contiguous, keys and values laid out alike")
    out = torch.empty_like(query)
    if S == 0:
        return out
    group = H // kv_heads
    interp = _interpreting(query)
    precision = dot_precision(query.dtype, interp)
    _paged_decode_kernel[(S, kv_heads)](
        query, keys, values, out, block_table, seqlens, float(scale),
        query.stride(0), query.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(1),
        block_table.stride(0),
        GROUP=group, GROUP_PAD=_pad16(group), D=D, D_PAD=_pad16(D),
        CACHE_BLOCK=cache_block, BLOCK_N=BLOCK_N,
        DOT_F32=interp, PRECISION="ieee" if interp else precision,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def tf32_enabled() -> bool:
    """Whether torch's fp32 CUDA matmuls may use TF32 (the newer fp32_precision setting where this
    torch has it: reading allow_tf32 raises once that one has been set)."""
    prec = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if isinstance(prec, str):
        return prec == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype, interp: bool = False) -> str:
    """The kernel's tl.dot input precision: fp32 caches follow torch's matmul setting (fp32 callers
    get fp32 dots unless they opted into TF32), half caches are tensor-core dots anyway."""
    if interp or (dtype == torch.float32 and not tf32_enabled()):
        return "ieee"
    return "tf32"
