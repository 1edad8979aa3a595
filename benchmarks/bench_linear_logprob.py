"""fused_linear_logprob fwd+bwd vs eager, torch.compile, Liger and the bare lm_head GEMMs.

Work model (hidden [N, H], weight [V, H]): the three lm_head GEMMs of forward + backward are
6NHV FLOPs — the floor any implementation pays; ours executes 8NHV (the logits are recomputed in
backward instead of stored). ``tflops`` below is 6NHV / time ("useful" TFLOP/s, comparable across
implementations); ``pct_gemm_floor`` is the bare GEMMs' time over this time.

GPU: time (do_bench median, 20/80 %) and peak allocator memory of forward + backward at the
Qwen2.5-VL-7B head (H = 3584, V = 152064) and a 0.5B-class head (H = 896, V = 151936), bf16.
CPU: peak extra resident memory of forward + backward at V = 152064, each implementation in its
own subprocess (VmHWM after resetting it through /proc/self/clear_refs), against the naive path.

    python -m benchmarks.bench_linear_logprob [--device cpu|cuda]
    python -m benchmarks --only linear_logprob
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import markdown_table, peak_memory_mb, time_ms  # noqa: E402
from staged.kernels import fused_linear_logprob  # noqa: E402
from staged.kernels.reference.linear_logprob import linear_logprob_eager  # noqa: E402

GPU_HEADS = [("7B head", 3584, 152064), ("0.5B head", 896, 151936)]
GPU_TOKENS = (2048, 8192)
CPU_SHAPE = (4096, 152064, 256)     # N, V, H: naive logits alone are N*V*4 B = 2.5 GB


def _inputs(N, V, H, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Created in place (no temporaries) so that the CPU RSS baseline is not inflated.
    h = torch.empty(N, H, dtype=dtype, device=device)
    h.copy_(torch.randn(N, H, generator=g))
    w = torch.empty(V, H, dtype=dtype, device=device)
    for v0 in range(0, V, 8192):   # in slices: no full-size fp32 temporary
        w[v0:v0 + 8192].copy_(torch.randn(min(8192, V - v0), H, generator=g).mul_(H ** -0.5))
    t = torch.randint(0, V, (N,), generator=g).to(device)
    gl = torch.randn(N, generator=g).to(device)
    return h.requires_grad_(), w.requires_grad_(), t, gl


# ---------------------------------------------------------------------------------------------
# implementations: each maps (hidden, weight, targets, upstream grad) -> a scalar to backward


def _eager(h, w, t, g):
    return (linear_logprob_eager(h, w, t)[0] * g).sum()


def _eager_entropy(h, w, t, g):
    logp, ent = linear_logprob_eager(h, w, t)
    return (logp * g + ent * g).sum()


def _staged(h, w, t, g):
    return (fused_linear_logprob(h, w, t) * g).sum()


def _staged_entropy(h, w, t, g):
    logp, ent = fused_linear_logprob(h, w, t, return_entropy=True)
    return (logp * g + ent * g).sum()


def _liger_flce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # reduction="none": per-token loss = -logp, recomputed in backward (Liger's own design for
    # per-token upstream gradients). No temperature argument: the benchmark runs T = 1.
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda h, w, t, g: (-loss(w, h, t) * g).sum()


def _liger_grpo_chunked(h, w, t, g):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # Liger's chunked (torch) path; its per-sequence chunks are [T, V] fp32 logits. It computes
    # a GRPO loss, not bare log-probs: a memory peer, not a like-for-like time peer.
    B = 8
    N, H = h.shape
    fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False)
    loss, _ = fn(h.view(B, N // B, H), w, t.view(B, N // B),
                 torch.ones(B, N // B, device=h.device), g[:B])
    return loss


class _GemmFloor:
    """The three lm_head GEMMs alone (logits = h W^T; dH = G W; dW = G^T h) with a fixed
    upstream G: the compute floor of any implementation (it materialises N x V logits)."""

    def __init__(self, h, w):
        self.G = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)

    def __call__(self, h, w, t, g):
        return _GemmOut.apply(h @ w.t(), self.G)


class _GemmOut(torch.autograd.Function):
    """Identity to a scalar whose backward hands the fixed G to the logits' GEMM backward
    (no extra N x V elementwise pass is timed)."""

    @staticmethod
    def forward(ctx, logits, G):
        ctx.save_for_backward(G)
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        (G,) = ctx.saved_tensors
        return G, None


def _step(fn, h, w, t, g):
    def run():
        h.grad = w.grad = None
        fn(h, w, t, g).backward()
    return run


# ---------------------------------------------------------------------------------------------
# GPU: time and peak memory


def _run_gpu(device, limits):
    rows = []
    impls = {"eager": _eager, "torch.compile": torch.compile(_eager, dynamic=False),
             "staged": _staged, "eager+entropy": _eager_entropy,
             "staged+entropy": _staged_entropy}
    try:
        impls["liger flce (none)"] = _liger_flce()
    except ImportError as exc:
        print(f"  liger-kernel unavailable: {exc}")
    for head, H, V in GPU_HEADS:
        for N in GPU_TOKENS:
            case = f"{head} N={N} H={H} V={V}"
            h, w, t, g = _inputs(N, V, H, torch.bfloat16, device)
            useful = 6 * N * H * V
            floor = _GemmFloor(h, w)
            base = None
            for name, fn in [("lm_head GEMMs (floor)", floor)] + list(impls.items()):
                run = _step(fn, h, w, t, g)
                try:
                    run()
                    tm = time_ms(run, device)
                    mem = peak_memory_mb(run, device)
                except torch.OutOfMemoryError:
                    rows.append({"case": case, "impl": name, "median_ms": None, "note": "OOM"})
                    torch.cuda.empty_cache()
                    continue
                if name.startswith("lm_head"):
                    base = tm["median_ms"]
                row = {"case": case, "impl": name, **tm, "tflops": useful / tm["median_ms"] / 1e9,
                       "pct_gemm_floor": 100 * base / tm["median_ms"] if base else None,
                       "pct_of_gemm_limit": (100 * useful / tm["median_ms"] / 1e9
                                             / limits["gemm_tflops"]) if limits else None,
                       "peak_mb": mem}
                rows.append(row)
            del h, w, t, g, floor
            torch.cuda.empty_cache()
    eager = {r["case"]: r for r in rows if r["impl"] == "eager" and r.get("median_ms")}
    for r in rows:
        e = eager.get(r["case"])
        if e and r.get("median_ms"):
            r["speedup_vs_eager"] = e["median_ms"] / r["median_ms"]
            if e.get("peak_mb") and r.get("peak_mb"):
                r["mem_vs_eager"] = r["peak_mb"] / e["peak_mb"]
    return rows


# ---------------------------------------------------------------------------------------------
# CPU: peak extra resident memory, one subprocess per implementation

CPU_IMPLS = {"eager": _eager, "staged": _staged, "staged+entropy": _staged_entropy,
             "liger grpo chunked": _liger_grpo_chunked}


def _rss_mb():
    status = open("/proc/self/status").read()
    cur = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    return cur, hwm


def measure_rss(impl: str, N: int, V: int, H: int) -> dict:
    """In this process: peak resident memory of one fp32 forward + backward of ``impl`` above
    the resident memory just before it (inputs allocated, kernels warmed up at tiny size)."""
    import time

    fn = CPU_IMPLS[impl]
    h, w, t, g = _inputs(N, V, H, torch.float32, "cpu")
    sh, sw, st, sg = _inputs(16, 64, H, torch.float32, "cpu", seed=1)
    _step(fn, sh, sw, st, sg)()      # warm-up: BLAS buffers, lazy imports
    del sh, sw, st, sg
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                 # reset VmHWM to the current RSS (Linux >= 4.0)
    base, _ = _rss_mb()
    t0 = time.perf_counter()
    _step(fn, h, w, t, g)()
    ms = (time.perf_counter() - t0) * 1e3
    _, peak = _rss_mb()
    grads_mb = (N * H + V * H) * 4 / 2**20     # dH and dW: outputs every implementation returns
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()
    return {"impl": impl, "N": N, "V": V, "H": H, "base_mb": base, "peak_mb": peak,
            "extra_mb": peak - base, "grads_mb": grads_mb, "ms": ms}


def measure_rss_subprocess(impl: str, N: int, V: int, H: int, timeout: float = 600) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)     # the CPU path under test is the chunked torch one
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_linear_logprob", "--measure-rss",
                          impl, str(N), str(V), str(H)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {impl} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_cpu(device, limits):
    N, V, H = CPU_SHAPE
    case = f"CPU fp32 N={N} H={H} V={V}"
    logits_mb = N * V * 4 / 2**20
    rows = []
    for impl in CPU_IMPLS:
        try:
            m = measure_rss_subprocess(impl, N, V, H)
        except Exception as exc:  # noqa: BLE001 - e.g. Liger missing; reported in the table
            reason = str(exc).strip().splitlines()[-1][:80] if str(exc).strip() else repr(exc)
            rows.append({"case": case, "impl": impl, "note": f"n/a: {reason}"})
            continue
        rows.append({"case": case, "impl": impl, "median_ms": m["ms"], "p20_ms": m["ms"],
                     "p80_ms": m["ms"], "tflops": 6 * N * H * V / m["ms"] / 1e9,
                     "peak_extra_mb": m["extra_mb"],
                     "extra_minus_grads_mb": m["extra_mb"] - m["grads_mb"],
                     "naive_logits_mb": logits_mb, "note": "one run (subprocess)"})
    eager = next((r for r in rows if r["impl"] == "eager" and "peak_extra_mb" in r), None)
    for r in rows:
        if eager and "peak_extra_mb" in r:
            r["mem_vs_eager"] = r["peak_extra_mb"] / eager["peak_extra_mb"]
    return rows


def run(device: str = "cpu", limits: dict | None = None) -> list[dict]:
    if device.startswith("cuda"):
        return _run_gpu(device, limits)
    return _run_cpu(device, limits)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--measure-rss", nargs=4, metavar=("IMPL", "N", "V", "H"),
                   help="(internal) measure one implementation's peak RSS and print JSON")
    args = p.parse_args(argv)
    if args.measure_rss:
        impl, N, V, H = args.measure_rss
        print(json.dumps(measure_rss(impl, int(N), int(V), int(H))))
        return 0
    print(markdown_table(run(args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
