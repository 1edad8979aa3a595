"""pack_embed forward + backward (the packed step's embedding kernels) as % of the copy bandwidth
measured in the same run, against torch's embedding + masked_scatter and its dense backward.

Byte model (T packed rows, H hidden, V vocab, e = 2 for bf16; text-only micro-batch):
    fwd     reads T*H*e table rows + 8T ids, writes T*H*e: 2*T*H*e bytes.
    fwd+bwd adds: reads T*H*e grad, V*H*e memset of the (dense) weight gradient, writes U*H*e
            (U distinct tokens), ~24T of keys / sort: ~ (3T + V + U) * H * e bytes in all.
``pct_of_copy`` = bytes / time against the copy bandwidth (read + write counted) of this run.
GPU: B = 64 samples x 2048 tokens (T = 131072), Qwen2.5-VL-7B's H = 3584, V = 152064, bf16.
CPU: skipped (the Triton kernels need CUDA or the interpreter; tests/kernels checks them).

    python -m benchmarks --only packing --device cuda
"""
from __future__ import annotations

import torch

from benchmarks.common import time_ms

B, L, H, V = 64, 2048, 3584, 152064


def _case(device, quick):
    from staged.packing.spans import build_span_tables

    b = 8 if quick else B
    [table] = build_span_tables([list(range(b))], [L] * b, [L // 4] * b)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (table.num_rows,), generator=g).to(device)
    w = (torch.randn(V, H, generator=g) * 0.02).to(device, torch.bfloat16).requires_grad_()
    grad = torch.randn(table.num_rows, H, generator=g).to(device, torch.bfloat16)
    return table.to(device), ids, w, grad


def run(device: str = "cpu", limits: dict | None = None, quick: bool = False) -> list[dict]:
    if not device.startswith("cuda"):
        return [{"case": "pack_embed", "impl": "staged",
                 "note": "n/a: Triton kernels need CUDA (interpreted in tests/kernels)"}]
    from staged.kernels.packing import pack_embed

    table, ids, w, grad = _case(device, quick)
    T = table.num_rows
    U = int(torch.unique(ids).numel())
    e = 2
    bytes_fwd = 2 * T * H * e + 8 * T
    bytes_bwd = bytes_fwd + (T + V + U) * H * e + 24 * T
    case = f"T={T} H={H} V={V} bf16 text"

    def ours_fwd():
        with torch.no_grad():
            pack_embed(ids, w, None, table.spans, num_vision_rows=0, check=False)

    def ours_step():
        w.grad = None
        pack_embed(ids, w, None, table.spans, num_vision_rows=0, check=False).backward(grad)

    def torch_fwd():
        with torch.no_grad():
            torch.nn.functional.embedding(ids, w)

    def torch_step():
        w.grad = None
        torch.nn.functional.embedding(ids, w).backward(grad)

    rows = []
    for impl, fwd, step in (("staged", ours_fwd, ours_step), ("torch embedding", torch_fwd, torch_step)):
        for passname, fn, nbytes in (("fwd", fwd, bytes_fwd), ("fwd+bwd", step, bytes_bwd)):
            tm = time_ms(fn, device)
            gbps = nbytes / tm["median_ms"] / 1e6
            rows.append({"case": case, "impl": impl, "pass": passname, **tm, "gbps": gbps,
                         "pct_of_copy": 100 * gbps / limits["copy_gbps"] if limits else None})
    return rows
