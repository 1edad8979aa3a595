"""grpo_loss fwd and fwd+bwd vs eager PyTorch, torch.compile and Liger's triton_grpo_loss.

The op is memory-bound, so it is judged in GB/s against the bytes it must move (the byte model
at the top of kernels/grpo_loss.py, implemented in ``bytes_moved``) and against the device copy
bandwidth measured in the same run. Every implementation is charged the same minimal byte count,
so GB/s is comparable across them ("effective" bandwidth). Eager and torch.compile run TRL's
formulation (``staged.kernels.reference.grpo_loss`` in fp32).

Liger's op takes logits [B, T+1, V] and fuses the log-softmax; it has no log-prob entry point,
so it runs with a tiny vocabulary (V = 16) and its rows say so: it moves 16x more input bytes.

GPU: do_bench median and 20/80 % quantiles at 4M tokens (padded [2048, 2048]), token-level DAPO
and sequence-level GSPO with KL and the vLLM correction, plus ours on the packed layout; then
ours alone at issue 14's target shape B=64, T=2048 (goal: >= 80 % of the copy bandwidth, column
``pct_of_copy``) and at few long sequences (B=2, T=65536: each row split over many programs).
CPU (64 x 1024 tokens; --quick 16 x 512): eager, ours as a CPU caller gets it (``backend="torch"``,
the plain-PyTorch path) and the fp64 reference, one torch thread, 30 repeats after 5 warm-ups; the
Triton numbers need a GPU (under TRITON_INTERPRET they would time the interpreter). GPU --quick:
256 x 1024 tokens.

    python -m benchmarks.bench_grpo_loss [--device cpu|cuda]
    python -m benchmarks --only grpo_loss
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import markdown_table, time_ms  # noqa: E402
from staged.kernels.reference.grpo_loss import grpo_loss_reference  # noqa: E402

CASES = [
    # name, options, uses the vLLM correction (sampling log-probs)
    ("dapo token beta=0.04", dict(loss_type="dapo", beta=0.04, importance_sampling_level="token"), False),
    ("gspo seq beta=0.04 +vLLM seq_mask", dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence",
                                               vllm_importance_sampling_mode="sequence_mask"), True),
]
GPU_SHAPE = (2048, 2048)   # B, T: 4M tokens, 16 MB per fp32 array (L2 is flushed between runs)
GPU_SHAPE_QUICK = (256, 1024)
TARGET_SHAPES = [(64, 2048), (2, 65536)]  # issue 14: % of copy bandwidth; few long sequences
CPU_SHAPE = (64, 1024)
LIGER_V = 16


def bytes_moved(opts: dict, N: int, B: int, *, vllm: bool, mask_bytes: int, backward: bool) -> int:
    """Minimal bytes of one forward (+ backward) — the byte model of kernels/grpo_loss.py."""
    beta = opts.get("beta", 0.0)
    seq = opts.get("importance_sampling_level") == "sequence"
    reads = 4 + 4 + (4 if beta else 0) + (4 if vllm else 0) + mask_bytes   # logp, old, ref, sampling, mask
    fwd = N * reads + B * (4 + 8 + 32)                                     # + advantages, cu_seqlens, row stats
    # (the per-program partials, B * S * 32 B with S ~ T / 256..1024, stay in L2: not counted)
    if not backward:
        return fwd
    has_direct = (not seq) or beta != 0.0 or opts.get("loss_type") == "cispo"
    fwd += 4 * N if has_direct else 0                                      # gradient buffer written
    bwd = N * ((4 if has_direct else 0) + (mask_bytes if seq else 0) + 4)  # buffer (+ mask) read, dlogp written
    return fwd + bwd


def _inputs(B, T, device, vllm, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3)
    x = dict(logp=logp.to(device),
             old=(logp + 0.1 * torch.randn(B, T, generator=g)).to(device),
             ref=(logp + 0.1 * torch.randn(B, T, generator=g)).to(device),
             adv=torch.randn(B, generator=g).to(device),
             mask=(torch.rand(B, T, generator=g) > 0.1).to(device))
    x["sampling"] = (x["old"] + 0.05 * torch.randn(B, T, generator=g).to(device)) if vllm else None
    return x


def _step(fn, leaf):
    def run():
        leaf.grad = None
        fn().backward()
    return run


def _fwd(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def _impls(x, opts, device, *, vllm):
    """name -> (loss closure, leaf that gets the gradient, note)."""
    from staged.kernels import grpo_loss

    lp = x["logp"].clone().requires_grad_(True)
    samp = dict(sampling_logp=x["sampling"]) if vllm else {}
    impls = {}

    def eager():
        return grpo_loss_reference(lp, x["old"], x["ref"], x["adv"], x["mask"], dtype=torch.float32,
                                   **samp, **opts)[0]

    impls["eager (TRL formulation)"] = (eager, lp, "")
    if device.startswith("cuda"):
        compiled = torch.compile(
            lambda lp_, old, ref, adv, mask, s: grpo_loss_reference(
                lp_, old, ref, adv, mask, dtype=torch.float32, **({"sampling_logp": s} if vllm else {}), **opts)[0],
            dynamic=False)
        impls["torch.compile"] = (lambda: compiled(lp, x["old"], x["ref"], x["adv"], x["mask"], x["sampling"]), lp, "")
        impls["staged"] = (lambda: grpo_loss(lp, x["old"], x["ref"], x["adv"], x["mask"], **samp, **opts)[0], lp, "")
        impls.update(_liger(x, opts, device, vllm=vllm))
    else:
        from staged.kernels import grpo_loss

        # what a CPU caller of staged.kernels.grpo_loss gets: its plain-PyTorch path (no host sync)
        impls["staged (torch path)"] = (lambda: grpo_loss(lp, x["old"], x["ref"], x["adv"], x["mask"], backend="torch",
                                                          **samp, **opts)[0], lp, "")
        lp64 = x["logp"].double().requires_grad_(True)
        impls["reference fp64"] = (lambda: grpo_loss_reference(lp64, x["old"], x["ref"], x["adv"], x["mask"],
                                                               **samp, **opts)[0], lp64, "")
    return impls


def _liger(x, opts, device, *, vllm):
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as exc:
        return {"liger triton_grpo_loss": (None, None, f"n/a: {exc}")}
    B, T = x["logp"].shape
    g = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(B, T + 1, LIGER_V, generator=g).to(device).requires_grad_(True)
    ids = torch.randint(0, LIGER_V, (B, T), generator=g).to(device)
    ratio = None
    if vllm:  # Liger takes the ratio precomputed (ours builds it in the kernel)
        d = ((x["old"] - x["sampling"]) * x["mask"]).sum(-1, keepdim=True)
        ratio = torch.exp(d)
        ratio = ratio.masked_fill(ratio > 3.0, 0.0)

    def fn():
        return triton_grpo_loss(logits, x["old"], x["ref"], ids, x["adv"], x["mask"], temperature=1.0,
                                beta=opts.get("beta", 0.0), eps_low=0.2, eps_high=0.2, inplace=False,
                                loss_type=opts["loss_type"], importance_sampling_level=opts["importance_sampling_level"],
                                reduce=True, vllm_is_ratio=ratio, use_bias_correction_kl=True)[0]
    return {"liger triton_grpo_loss": (fn, logits, f"logits input, V={LIGER_V}: reads {LIGER_V}x more")}


def _time_case(case, opts, vllm, B, T, device, limits, *, packed=False, only_ours=False):
    rows = []
    x = _inputs(B, T, device, vllm)
    impls = _impls(x, opts, device, vllm=vllm) if not packed else _packed_impls(x, opts, device, vllm=vllm)
    if only_ours:
        impls = {k: v for k, v in impls.items() if k == "staged"}
    for name, (fn, leaf, note) in impls.items():
        N = leaf.numel() if packed else B * T  # tokens actually in the batch
        if fn is None:
            rows.append({"case": case, "impl": name, "pass": "fwd+bwd", "note": note})
            continue
        for passname, runner, backward in (("fwd", _fwd(fn), False), ("fwd+bwd", _step(fn, leaf), True)):
            try:
                runner()
                tm = time_ms(runner, device) if device.startswith("cuda") else time_ms(runner, device, warmup=5, rep=30)
            except Exception as exc:  # noqa: BLE001 - reported in the table, others carry on
                rows.append({"case": case, "impl": name, "pass": passname,
                             "note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"})
                continue
            nbytes = bytes_moved(opts, N, B, vllm=vllm, mask_bytes=1, backward=backward)
            gbps = nbytes / tm["median_ms"] / 1e6
            rows.append({"case": case, "impl": name, "pass": passname, **tm, "gbps": gbps,
                         "pct_of_copy": 100 * gbps / limits["copy_gbps"] if limits else None,
                         "note": note})
    base = {(r["case"], r["pass"]): r["median_ms"] for r in rows
            if r["impl"].startswith("eager") and r.get("median_ms")}
    for r in rows:
        b = base.get((r["case"], r["pass"]))
        if b and r.get("median_ms"):
            r["speedup_vs_eager"] = b / r["median_ms"]
    return rows


def _packed_impls(x, opts, device, *, vllm):
    """Ours on the packed layout: the same tokens, rows of random lengths in one buffer."""
    from staged.kernels import grpo_loss

    B, T = x["logp"].shape
    g = torch.Generator(device="cpu").manual_seed(2)
    lens = torch.randint(T // 4, T + 1, (B,), generator=g)
    keep = (torch.arange(T)[None, :] < lens[:, None]).to(device)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device=device, dtype=torch.int32)
    flat = {k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in x.items()}
    lp = flat["logp"].clone().requires_grad_(True)
    samp = dict(sampling_logp=flat["sampling"]) if vllm else {}
    return {"staged packed": (lambda: grpo_loss(lp, flat["old"], flat["ref"], flat["adv"], flat["mask"],
                                                cu_seqlens=cu, **samp, **opts)[0], lp,
                              f"N={int(lens.sum())} tokens")}


def run(device: str = "cpu", limits: dict | None = None, quick: bool = False) -> list[dict]:
    rows = []
    if device.startswith("cuda"):
        B, T = GPU_SHAPE_QUICK if quick else GPU_SHAPE
        for case, opts, vllm in CASES:
            rows += _time_case(f"{case} B={B} T={T}", opts, vllm, B, T, device, limits)
        case, opts, vllm = CASES[1]
        packed = _time_case(f"{case} packed B={B} T<={T}", opts, vllm, B, T, device, limits, packed=True)
        rows += packed
        for tB, tT in TARGET_SHAPES:
            for case, opts, vllm in CASES:
                rows += _time_case(f"{case} B={tB} T={tT}", opts, vllm, tB, tT, device, limits, only_ours=True)
        return rows
    B, T = (16, 512) if quick else CPU_SHAPE
    # One torch thread: a millisecond op on a shared machine otherwise waits in OpenMP barriers for
    # a descheduled sibling thread (medians of 300+ ms were seen with two threads on two busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case, opts, vllm in CASES:
            rows += _cpu_case(case, opts, vllm, B, T, device, limits)
    finally:
        torch.set_num_threads(threads)
    return rows


def _cpu_case(case, opts, vllm, B, T, device, limits):
    name = f"{case} B={B} T={T}"
    return _time_case(name, opts, vllm, B, T, device, limits) + [
        {"case": name, "impl": "staged triton / torch.compile / liger",
         "note": "Triton kernels need a CUDA GPU (interpreted timings are meaningless)"}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes")
    args = p.parse_args(argv)
    from benchmarks.common import measured_limits

    print(markdown_table(run(args.device, limits=measured_limits(args.device), quick=args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
