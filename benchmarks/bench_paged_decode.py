"""Decode attention over the paged KV cache: the Triton kernel (staged.kernels.paged_decode) vs
the torch path it replaces on CUDA without flash-attn (gather every row's blocks, SDPA with a
length mask), as % of the read bound: the live tokens' K and V read once, over the copy
bandwidth measured in the same run. Qwen2.5-VL-7B's attention layout (28 heads over 4 kv heads,
head_dim 128), bf16, cache blocks of 16 tokens scattered over the pool; one layer's call (the
engine makes one per layer per step). Rows whose contexts vary around the case's: 64 rows at
~1,024 and ~4,096 tokens (many programs per SM either way), and the shapes split-KV is for,
few rows at long contexts -- 8 rows at ~8,192 and 64 at ~2,048 -- where one program per row and
kv head (the kernel with ``split=None``, also timed) leaves most SMs idle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import time_ms

HEADS, KV_HEADS, D, BLOCK = 28, 4, 128, 16
CASES = ((64, 1024), (64, 4096), (8, 8192), (64, 2048))   # rows, context


def make_case(device: str, rows: int, context: int, gen: torch.Generator):
    """q, the pools, a scattered block table, the lengths (context/2 .. 3/2 context) and their sum."""
    lens = (context // 2 + torch.randint(0, context, (rows,), generator=gen)).tolist()
    need = [-(-n // BLOCK) for n in lens]
    nb = sum(need) + 1
    keys = torch.randn(nb, BLOCK, KV_HEADS, D, generator=gen).to(device, torch.bfloat16)
    values = torch.randn(nb, BLOCK, KV_HEADS, D, generator=gen).to(device, torch.bfloat16)
    order = torch.randperm(nb, generator=gen).tolist()
    width, table, at = max(need), [], 0
    for k in need:
        table.append(order[at:at + k] + [order[-1]] * (width - k))
        at += k
    table = torch.tensor(table, dtype=torch.int32, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(rows, HEADS, D, generator=gen).to(device, torch.bfloat16)
    return q, keys, values, table, seqlens, sum(lens)


def torch_decode(q, keys, values, table, seqlens, scale):
    """staged.rollout.paged_attention's torch backend on CUDA: gather, pad, mask, SDPA."""
    rows = q.shape[0]
    bt = table.long()
    mask = (torch.arange(table.shape[1] * BLOCK, device=q.device)[None] < seqlens[:, None])[:, None, None]
    k = keys[bt].view(rows, -1, KV_HEADS, D).transpose(1, 2)
    v = values[bt].view(rows, -1, KV_HEADS, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[:, :, 0]


def run(device: str = "cpu", limits: dict | None = None, quick: bool = False) -> list[dict]:
    if not device.startswith("cuda"):
        return [{"case": "paged decode attention", "impl": "staged",
                 "note": "n/a: Triton kernels need CUDA (interpreted in tests/kernels)"}]
    from staged.kernels.paged_decode import SPLIT, paged_decode_attention

    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for rows, context in ((8, 256),) if quick else CASES:
        q, keys, values, table, seqlens, tokens = make_case(device, rows, context, gen)
        args = (q, keys, values, table, seqlens, D ** -0.5)
        impls = (  # timed within this iteration, so the closures see this case's tensors
            ("staged", lambda: paged_decode_attention(*args)),
            ("staged, one pass", lambda: paged_decode_attention(*args, split=None)),   # the kernel before split-KV
            ("torch gather + SDPA", lambda: torch_decode(*args)),
        )
        want = impls[-1][1]().float()
        read = 2 * tokens * KV_HEADS * D * 2  # K and V of the live tokens, bf16
        case = f"{rows} rows, ~{context} ctx, 28/4 heads, d128, bf16, split {SPLIT}"
        mine = []
        for impl, fn in impls:
            tm = time_ms(fn, device, graphed=True)  # ~50 us calls: launch overhead would be what is timed
            gbps = read / tm["median_ms"] / 1e6
            mine.append({"case": case, "impl": impl, **tm, "kv_read_gbps": gbps,
                         "pct_of_read_bound": 100 * gbps / limits["copy_gbps"] if limits else None})
        for r, (_, fn) in zip(mine[:-1], impls):
            r.update(speedup_vs_torch=mine[-1]["median_ms"] / r["median_ms"],
                     max_abs_diff_vs_torch=(fn().float() - want).abs().max().item())
        mine[0]["speedup_vs_one_pass"] = mine[1]["median_ms"] / mine[0]["median_ms"]
        rows_out += mine
    return rows_out
