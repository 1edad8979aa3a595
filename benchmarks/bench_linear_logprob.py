"""fused_linear_logprob fwd and fwd+bwd vs eager, torch.compile, Liger and the bare lm_head GEMMs.

Work model (hidden [N, H], weight [V, H]): the three lm_head GEMMs of forward + backward are
6NHV FLOPs — the floor any implementation pays; ours executes 8NHV (the logits are recomputed in
backward instead of stored); the forward alone is 2NHV. ``tflops`` below is 6NHV (fwd: 2NHV) /
time ("useful" TFLOP/s, comparable across implementations); ``pct_gemm_floor`` is the bare GEMMs'
time over this time; ``pct_of_gemm_limit`` is against the GEMM rate measured in the same run.

GPU: time (do_bench median, 20/80 %) and peak allocator memory of the forward (no grad; floor
2NHV) and of forward + backward at the Qwen2.5-VL-7B head (H = 3584, V = 152064), the 3B head
(H = 2048, V = 151936) and a 0.5B-class head (H = 896, V = 151936), bf16, N = 2048 and 8192
tokens (--quick: the 7B head at N = 2048). On sm_90 also ``staged (tma)``: the same op with the
TMA forward (``tma=True``: tensor-descriptor loads, persistent grid; the default ``staged`` rows
run the cp.async forward), with ``vs_cp_async`` = its time / the cp.async time in the same run:
the TMA forward has not run on a GPU before, and this is where the first GPU session decides
whether it becomes the sm_90 default.
CPU: peak extra resident memory of one fp32 forward + backward at V = 152064 (H = 256, N = 2048
tokens; N = 512 with --quick), each implementation in its own subprocess (VmHWM after resetting
it through /proc/self/clear_refs), against the naive path (eager: materialises N x V logits, their
log-softmax and its gradient) and Liger's chunked GRPO loss (its torch path: the one that runs on
a CPU; Liger's fused linear cross-entropy is Triton-only). N = 4096 takes ~4 minutes and ~12 GB
for the naive path on a 2-core machine, so the CPU run stops at 2048: the memory ratios only grow
with N (the naive path is linear in N x V, the chunked ones are not).

    python -m benchmarks.bench_linear_logprob [--device cpu|cuda]
    python -m benchmarks --only linear_logprob
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import hwm_mb, markdown_table, peak_memory_mb, reset_peak_rss, rss_mb, time_ms  # noqa: E402
from staged.kernels import fused_linear_logprob  # noqa: E402
from staged.kernels.reference.linear_logprob import linear_logprob_eager  # noqa: E402

GPU_HEADS = [("7B head", 3584, 152064), ("3B head", 2048, 151936), ("0.5B head", 896, 151936)]
GPU_TOKENS = (2048, 8192)
# `make gpu-check` (STAGED_BENCH_GPU_CHECK=1): the 7B head only, at N = 2048 and 16384 tokens,
# sized for a 15-minute lent GPU.
GPU_CHECK = os.environ.get("STAGED_BENCH_GPU_CHECK") == "1"
GPU_CHECK_TOKENS = (2048, 16384)
CPU_SHAPE = (2048, 152064, 256)     # N, V, H: naive logits alone are N*V*4 B = 1.2 GB
CPU_SHAPE_QUICK = (512, 152064, 256)


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
    return (fused_linear_logprob(h, w, t, tma=False) * g).sum()


def _staged_entropy(h, w, t, g):
    logp, ent = fused_linear_logprob(h, w, t, return_entropy=True, tma=False)
    return (logp * g + ent * g).sum()


def _staged_tma(h, w, t, g):
    return (fused_linear_logprob(h, w, t, tma=True) * g).sum()


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


def _fwd(fn, h, w, t, g):
    def run():
        with torch.no_grad():
            fn(h, w, t, g)
    return run


def _run_gpu(device, limits, quick=False):
    rows = []
    arch = 90 if torch.cuda.get_device_capability()[0] >= 9 else 80
    impls = {"eager": _eager, "torch.compile": torch.compile(_eager, dynamic=False),
             "staged": _staged, "eager+entropy": _eager_entropy,
             "staged+entropy": _staged_entropy}
    if arch >= 90:
        impls["staged (tma)"] = _staged_tma
    try:
        impls["liger flce (none)"] = _liger_flce()
    except ImportError as exc:
        print(f"  liger-kernel unavailable: {exc}")
    heads, tokens = (GPU_HEADS[:1], GPU_TOKENS[:1]) if quick else (GPU_HEADS, GPU_TOKENS)
    if GPU_CHECK:
        heads, tokens = GPU_HEADS[:1], GPU_CHECK_TOKENS
    from staged.kernels import fused_linear_logprob_workspace
    for head, H, V in heads:
        for N in tokens:
            case = f"{head} N={N} H={H} V={V}"
            h, w, t, g = _inputs(N, V, H, torch.bfloat16, device)
            floor = _GemmFloor(h, w)
            base = {}
            for name, fn in [("lm_head GEMMs (floor)", floor)] + list(impls.items()):
                for passname, make, flops in (("fwd", _fwd, 2 * N * H * V), ("fwd+bwd", _step, 6 * N * H * V)):
                    run = make(fn, h, w, t, g)
                    try:
                        run()
                        tm = time_ms(run, device)
                        mem = peak_memory_mb(run, device)
                    except torch.OutOfMemoryError:
                        rows.append({"case": case, "impl": name, "pass": passname, "note": "OOM"})
                        torch.cuda.empty_cache()
                        continue
                    except Exception as exc:  # noqa: BLE001 - e.g. an older Liger; the others carry on
                        rows.append({"case": case, "impl": name, "pass": passname,
                                     "note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"})
                        continue
                    if name.startswith("lm_head"):
                        base[passname] = tm["median_ms"]
                    b = base.get(passname)
                    logits_mb = N * V * 4 / 2**20
                    ws = (fused_linear_logprob_workspace(N, H, V, torch.bfloat16, arch=arch) / 2**20
                          if name.startswith("staged") else None)
                    rows.append({"case": case, "impl": name, "pass": passname, **tm,
                                 "tflops": flops / tm["median_ms"] / 1e9,
                                 "x_gemm": tm["median_ms"] / b if b else None,
                                 "pct_gemm_floor": 100 * b / tm["median_ms"] if b else None,
                                 "workspace_pct_logits": 100 * ws / logits_mb if ws else None,
                                 "peak_pct_logits": 100 * mem / logits_mb if mem else None,
                                 "pct_of_gemm_limit": (100 * flops / tm["median_ms"] / 1e9
                                                       / limits["gemm_tflops"]) if limits else None,
                                 "peak_mb": mem})
            del h, w, t, g, floor
            torch.cuda.empty_cache()
    eager = {(r["case"], r["pass"]): r for r in rows if r["impl"] == "eager" and r.get("median_ms")}
    cp = {(r["case"], r["pass"]): r for r in rows if r["impl"] == "staged" and r.get("median_ms")}
    for r in rows:
        c = cp.get((r["case"], r.get("pass")))
        if r["impl"] == "staged (tma)" and c and r.get("median_ms"):
            r["vs_cp_async"] = r["median_ms"] / c["median_ms"]
        e = eager.get((r["case"], r.get("pass")))
        if e and r.get("median_ms"):
            r["speedup_vs_eager"] = e["median_ms"] / r["median_ms"]
            if e.get("peak_mb") and r.get("peak_mb"):
                r["mem_vs_eager"] = r["peak_mb"] / e["peak_mb"]
    return rows


# ---------------------------------------------------------------------------------------------
# CPU: peak extra resident memory, one subprocess per implementation

CPU_IMPLS = {"eager": _eager, "staged": _staged, "staged+entropy": _staged_entropy,
             "liger grpo chunked": _liger_grpo_chunked}


def measure_rss(impl: str, N: int, V: int, H: int) -> dict:
    """In this process: peak resident memory of one fp32 forward + backward of ``impl`` above
    the resident memory just before it (inputs allocated, kernels warmed up at tiny size)."""
    import time

    fn = CPU_IMPLS[impl]
    h, w, t, g = _inputs(N, V, H, torch.float32, "cpu")
    sh, sw, st, sg = _inputs(16, 64, H, torch.float32, "cpu", seed=1)
    _step(fn, sh, sw, st, sg)()      # warm-up: BLAS buffers, lazy imports
    del sh, sw, st, sg
    if not reset_peak_rss():         # VmHWM back to the current RSS (Linux >= 4.0)
        raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs): Linux only")
    base = rss_mb()
    t0 = time.perf_counter()
    _step(fn, h, w, t, g)()
    ms = (time.perf_counter() - t0) * 1e3
    peak = hwm_mb()
    grads_mb = (N * H + V * H) * 4 / 2**20     # dH and dW: outputs every implementation returns
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()
    return {"impl": impl, "N": N, "V": V, "H": H, "base_mb": base, "peak_mb": peak,
            "extra_mb": peak - base, "grads_mb": grads_mb, "ms": ms}


def measure_rss_subprocess(impl: str, N: int, V: int, H: int, timeout: float = 600) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)     # the CPU path under test is the chunked torch one
    # Blocks over 64 KiB from mmap, returned to the OS when freed: the peak RSS is then the peak of
    # live tensors, not of glibc's cached arenas (which varied it by +-100 MB from run to run).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_linear_logprob", "--measure-rss",
                          impl, str(N), str(V), str(H)], check=False, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {impl} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_cpu(device, limits, quick=False):
    N, V, H = CPU_SHAPE_QUICK if quick else CPU_SHAPE
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
        tflops = 6 * N * H * V / m["ms"] / 1e9
        rows.append({"case": case, "impl": impl, "pass": "fwd+bwd", "median_ms": m["ms"], "p20_ms": m["ms"],
                     "p80_ms": m["ms"], "tflops": tflops,
                     "pct_of_gemm_limit": 100 * tflops / limits["gemm_tflops"] if limits else None,
                     "peak_extra_mb": m["extra_mb"],
                     "extra_minus_grads_mb": m["extra_mb"] - m["grads_mb"],
                     "naive_logits_mb": logits_mb, "note": "one run, own subprocess"})
    for peer, key in (("eager", "mem_vs_eager"), ("liger grpo chunked", "mem_vs_liger")):
        ref = next((r for r in rows if r["impl"] == peer and "peak_extra_mb" in r), None)
        for r in rows:
            if ref and "peak_extra_mb" in r:
                r[key] = r["peak_extra_mb"] / ref["peak_extra_mb"]
    return rows


def run(device: str = "cpu", limits: dict | None = None, quick: bool = False) -> list[dict]:
    if device.startswith("cuda"):
        return _run_gpu(device, limits, quick=quick)
    return _run_cpu(device, limits, quick=quick)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--measure-rss", nargs=4, metavar=("IMPL", "N", "V", "H"),
                   help="(internal) measure one implementation's peak RSS and print JSON")
    args = p.parse_args(argv)
    if args.measure_rss:
        impl, N, V, H = args.measure_rss
        print(json.dumps(measure_rss(impl, int(N), int(V), int(H))))
        return 0
    from benchmarks.common import measured_limits

    print(markdown_table(run(args.device, limits=measured_limits(args.device), quick=args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
