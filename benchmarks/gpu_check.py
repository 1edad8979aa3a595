"""``make gpu-check`` (``python -m benchmarks.gpu_check``): everything a lent GPU can tell us, in
one command, in under 8 minutes (a cold H100/H200 of the lent image: torch 2.11, triton 3.6,
transformers 5.17, no flash-attn / xformers / network; liger-kernel when carried as a wheel).

1. the CUDA tests: tests/kernels and tests/packing (not ``slow``) with the kernels compiled for
   the real card instead of interpreted (the workspace test holds the allocator's peak to
   ``fused_linear_logprob_workspace``; the attention backends torch_varlen / flex against the
   SDPA loop), and the rollout engine's CUDA-only tests (graphs replay the eager steps bit for
   bit, rows at max_new_tokens between the host's looks, neighbours); the CPU-only TRL-adapter
   and AOT-compile tests are left to ``make test``;
2. the microbenchmarks (``python -m benchmarks --only paged_decode rollout rollout_at_scale
   linear_logprob grpo_loss packing --device cuda`` with STAGED_BENCH_GPU_CHECK=1, in that
   order): the fused log-prob at the 7B head, N = 2048 and 16384, as a ratio to the cuBLAS lm_head GEMMs timed in the same run (``x_gemm``) and its
   workspace as % of fp32 logits, and on sm_90 the TMA forward (``tma=True``, opt-in until
   this measures it) beside the cp.async one (``tma/cp.async`` time ratios); GRPO loss and
   pack_embed as % of the copy bandwidth measured in the same run; vs eager, torch.compile and
   Liger where installed; the rollout engines in bf16 on the short shape (paged vs the old loop
   vs transformers' generate(), decode as % of the weight + KV read bound; with the Triton decode
   attention and with the torch one; then, as ``rollout_at_scale``, decode at 64 and 128 rows of
   two 7B-shaped layers and the real head: the issue's >= 60% goal), the Triton decode attention
   alone at the 7B layout as % of
   the KV read bound vs the torch gather + SDPA. Each benchmark
   appends its table to benchmarks/RESULTS.md as it finishes;
3. a short 1-GPU training run of the embedded default in bf16 (``python -m staged.train`` with
   the shipped default recipe, each stage cut to a few steps; attention flash_attention_2 when
   flash-attn is installed, else SDPA; a failed flash-attn run is retried with SDPA),

then one summary table, printed last and appended to benchmarks/RESULTS.md under the card, date
and versions. Each step has its own time limit inside a total budget of ``BUDGET_S`` seconds; a
step whose prerequisites are missing (pytest, transformers, ...) is reported as skipped with the
reason and the others carry on. Without a CUDA GPU it says so and exits 0.

``--dry-run`` (CPU, in the test suite): every step up to its CUDA calls — the test selection is
collected by pytest, the benchmark modules are imported and their names checked, the training
overrides are parsed into a config, the summary table is built and appended (``--results``
chooses the file) — so that nothing but the GPU work itself is first run on a lent machine.
Exit status: 1 when a step failed or ran out of time, else 0.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 450          # the whole check, start to summary: 7.5 minutes (< 8 with start-up)
# The rollout's first: generation is most of a GRPO step, and the kernel benchmarks after it spend
# much of their time in cold torch.compile runs (a time-out keeps the tables already appended).
BENCHES = ["paged_decode", "rollout", "rollout_at_scale", "linear_logprob", "grpo_loss", "packing"]
TRAIN_OUT = "outputs/gpu-check"

# The default recipe (staged/configs/default.toml: perception -> textual -> visual) with every
# stage cut short: SFT warm-up steps first (format), then GRPO steps, in each stage.
TRAIN_OVERRIDES = [
    "device=cuda", "precision=bf16", f"output_dir={TRAIN_OUT}", "resume=never", "progress=false", "tensorboard=false",
    "stages.0.steps=4", "stages.0.sft_warmup_steps=2",
    "stages.1.steps=3", "stages.1.sft_warmup_steps=1",
    "stages.2.steps=3",
]


def _missing(*modules: str) -> str | None:
    """None when every module is importable, else the reason (names the first missing one)."""
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                return f"{m} is not installed"
        except (ImportError, ValueError) as exc:
            return f"{m} cannot be imported ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------------------------------------
# running one step: output streamed live, the tail kept, the process group killed at the limit


def run_cmd(cmd: list[str], limit: float) -> tuple[str, float, list[str]]:
    """Run ``cmd`` in ROOT for at most ``limit`` s. Returns (status, seconds, last lines)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)   # the real compiler, not the interpreter
    t0 = time.time()
    tail: collections.deque[str] = collections.deque(maxlen=400)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):   # the whole group: pytest/benchmark children too
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        status = f"TIMEOUT ({limit:.0f} s)"
    reader.join(timeout=5)
    return status, time.time() - t0, list(tail)


def _last_match(lines: list[str], needles: tuple[str, ...]) -> str:
    for line in reversed(lines):
        if any(n in line for n in needles):
            return line.strip("= ").strip()
    return lines[-1].strip() if lines else ""


# ---------------------------------------------------------------------------------------------
# the steps


def _dry(cmd: list[str], limit: float, env: dict | None = None) -> tuple[str, float, list[str]]:
    """Run a CPU-side stand-in for a step's command (interpreter on, output captured)."""
    t0 = time.time()
    e = dict(os.environ, TRITON_INTERPRET="1", **(env or {}))
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=limit,
                       check=False)
    lines = (p.stdout + p.stderr).splitlines()
    return ("dry-run ok" if p.returncode == 0 else f"FAILED (exit {p.returncode})"), \
        time.time() - t0, lines


TEST_ARGS = ["-m", "not slow", "--ignore=tests/kernels/test_trl_adapter.py",
             "--ignore=tests/kernels/test_aot_compile.py", "tests/kernels", "tests/packing",
             "tests/rollout/test_engine_cuda.py"]


def step_tests(limit: float, dry: bool = False) -> list[dict]:
    why = _missing("pytest")
    if why:
        return [{"step": "cuda tests", "status": "skipped", "detail": why}]
    if dry:
        status, secs, tail = _dry([sys.executable, "-m", "pytest", "--collect-only", "-q",
                                   "-p", "no:cacheprovider", *TEST_ARGS], limit)
        detail = _last_match(tail, (" collected", "error"))
        return [{"step": "cuda tests", "status": status, "seconds": secs, "detail": detail}]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *TEST_ARGS]
    status, secs, tail = run_cmd(cmd, limit)
    detail = _last_match(tail, (" passed", " failed", " error", "no tests ran"))
    return [{"step": "cuda tests", "status": status, "seconds": secs, "detail": detail}]


_RATIO_KEYS = ("x_gemm", "workspace_pct_logits", "speedup_vs_eager", "mem_vs_eager", "pct_of_gemm_limit",
               "pct_of_copy", "speedup_vs_python", "speedup_vs_transformers", "time_vs_trl", "rss_vs_trl",
               "pct_of_read_bound", "speedup_vs_torch", "x_vs_generate", "speedup_vs_one_pass")


def bench_headline(rows: list[dict]) -> str:
    """'key lo-hi' over the rows of our implementation (staged / cpp / the paged rollout engine with
    its defaults), fwd+bwd where there is a pass."""
    ours = [r for r in rows if str(r.get("impl", "")) in ("staged", "cpp", "paged")]
    if any(r.get("pass") for r in ours):
        ours = [r for r in ours if r.get("pass") == "fwd+bwd"]
    parts = []
    for k in _RATIO_KEYS:
        vals = [r[k] for r in ours if isinstance(r.get(k), (int, float))]
        if vals:
            lo, hi = min(vals), max(vals)
            unit = "%" if k.startswith("pct") else "x"
            parts.append(f"{k} {lo:.3g}{unit}" if abs(hi - lo) < 1e-9 else f"{k} {lo:.3g}-{hi:.3g}{unit}")
    # the TMA forward (sm_90, opt-in until measured): its time over the cp.async forward's
    tma = [r for r in rows if r.get("impl") == "staged (tma)"
           and isinstance(r.get("vs_cp_async"), (int, float))]
    for p in ("fwd", "fwd+bwd"):
        vals = [r["vs_cp_async"] for r in tma if r.get("pass") == p]
        if vals:
            lo, hi = min(vals), max(vals)
            span = f"{lo:.3g}x" if hi == lo else f"{lo:.3g}-{hi:.3g}x"
            parts.append(f"tma/cp.async {p} {span}")
    notes = sorted({str(r.get("note")) for r in rows if str(r.get("note", "")).startswith(("skipped", "failed", "n/a"))})
    if notes:
        parts.append("; ".join(n[:60] for n in notes[:2]))
    return ", ".join(parts) or "(no ratios)"


def step_benchmarks(limit: float, dry: bool = False) -> list[dict]:
    why = _missing("triton")
    if why:
        return [{"step": "microbenchmarks", "status": "skipped", "detail": why}]
    if dry:
        from benchmarks.__main__ import available

        missing = [b for b in BENCHES if b not in available()]
        if missing:
            return [{"step": "microbenchmarks", "status": "FAILED", "detail": f"unknown {missing}"}]
        code = ("import importlib, inspect; from benchmarks.__main__ import BENCHMARKS as B; "
                f"[importlib.import_module(B[n]).run for n in {BENCHES!r}]; print('imported')")
        status, secs, tail = _dry([sys.executable, "-c", code], limit,
                                  {"STAGED_BENCH_GPU_CHECK": "1"})
        return [{"step": "microbenchmarks", "status": status, "seconds": secs,
                 "detail": f"{', '.join(BENCHES)} importable" if status == "dry-run ok"
                 else _last_match(tail, ("Error",))[:160]}]
    with tempfile.TemporaryDirectory(prefix="staged-gpu-check-") as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "benchmarks", "--only", *BENCHES, "--device", "cuda",
               "--json", str(out)]
        os.environ["STAGED_BENCH_GPU_CHECK"] = "1"     # inherited by run_cmd's child
        status, secs, tail = run_cmd(cmd, limit)
        dump = json.loads(out.read_text()) if out.exists() else {"benchmarks": {}}
    done = dump.get("benchmarks", {})
    res = [{"step": "microbenchmarks", "status": status, "seconds": secs,
            "detail": f"{len(done)} benchmark(s) finished, appended to benchmarks/RESULTS.md"
            + ("" if status == "ok" else f"; last line: {tail[-1][:80] if tail else ''}")}]
    for name, b in done.items():
        skipped = b.get("skipped")
        res.append({"step": f"  {name}", "status": "skipped" if skipped else "ok", "seconds": b.get("seconds"),
                    "detail": skipped or bench_headline(b.get("rows", []))})
    return res


def _train_summary(out_dir: Path) -> str:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return "no metrics.jsonl written"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    grpo = [r for r in recs if r.get("kind") == "grpo"]
    skipped = sum(bool(r.get("skipped")) for r in recs)
    parts = [f"{len(recs)} steps ({len(grpo)} GRPO)"]
    if grpo:
        parts.append(f"GRPO step {statistics.median(r['step_time_s'] for r in grpo):.2f} s median")
        parts.append(f"{statistics.median(r['tokens_per_s'] for r in grpo):.0f} tok/s")
        parts.append(f"reward {grpo[-1].get('reward', float('nan')):.3f} at the end")
    peak = [r.get("peak_mem_mb") for r in recs if isinstance(r.get("peak_mem_mb"), (int, float))]
    if peak:
        parts.append(f"peak {max(peak):.0f} MiB")
    if skipped:
        parts.append(f"{skipped} non-finite step(s) skipped")
    return ", ".join(parts)


def step_train(limit: float, dry: bool = False) -> list[dict]:
    why = _missing("transformers")
    if why:
        return [{"step": "train smoke (bf16, 1 GPU)", "status": "skipped", "detail": why}]
    attns = ["flash_attention_2", "sdpa"] if importlib.util.find_spec("flash_attn") else ["sdpa"]
    if dry:
        t0 = time.time()
        from staged.config import load_config

        cfg = load_config(None, [f"attn_implementation={attns[-1]}", *TRAIN_OVERRIDES])
        steps = sum(st.steps for st in cfg.stages)
        return [{"step": f"train smoke (bf16, 1 GPU, {attns[-1]})", "status": "dry-run ok",
                 "seconds": time.time() - t0,
                 "detail": f"config valid: {len(cfg.stages)} stages, {steps} steps"}]
    res = []
    t_end = time.time() + limit
    for attn in attns:
        left = t_end - time.time()
        name = f"train smoke (bf16, 1 GPU, {attn})"
        if left < 20:
            res.append({"step": name, "status": "skipped", "detail": "no time left in the budget"})
            break
        shutil.rmtree(ROOT / TRAIN_OUT, ignore_errors=True)   # this check's own output: no stale metrics
        cmd = [sys.executable, "-m", "staged.train", f"attn_implementation={attn}", *TRAIN_OVERRIDES]
        status, secs, tail = run_cmd(cmd, left)
        ok = status == "ok"
        detail = _train_summary(ROOT / TRAIN_OUT) if ok else _last_match(tail, ("Error", "error"))[:160]
        res.append({"step": name, "status": status, "seconds": secs, "detail": detail})
        if ok:
            break
        if attn != attns[-1]:
            print(f"\n{name} failed; retrying with {attns[-1]}", flush=True)
    return res


# (name, function, its own time limit, seconds kept in reserve for it by the steps before)
STEPS = [
    ("cuda tests", step_tests, 150, 30),
    ("microbenchmarks", step_benchmarks, 200, 60),
    ("train smoke", step_train, 80, 45),
]


def summary_table(results: list[dict]) -> str:
    lines = ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for r in results:
        secs = r.get("seconds")
        lines.append(f"| {r['step']} | {r['status']} | {'' if secs is None else f'{secs:.0f}'} | "
                     f"{str(r.get('detail', '')).replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: every step up to its CUDA calls (see the module docstring)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                    help="where the summary table is appended")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError as exc:
        print(f"gpu-check: torch is not importable ({exc}); run `make env` first.")
        return 1
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to "
              "check here. The CPU checks are `make test` and `python -m benchmarks --all`.")
        return 0
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_header

    t_start = time.time()
    deadline = t_start + BUDGET_S
    header = machine_header("cpu" if dry else "cuda")
    print(f"gpu-check{' --dry-run' if dry else ''} on {header}; budget {BUDGET_S} s", flush=True)
    results: list[dict] = []
    for i, (name, fn, limit, _) in enumerate(STEPS):
        reserve = sum(r for *_, r in STEPS[i + 1:])
        left = deadline - time.time() - reserve
        if left < 15:
            results.append({"step": name, "status": "skipped", "detail": "no time left in the budget"})
            continue
        print(f"\n=== {name} (limit {min(limit, left):.0f} s) ===", flush=True)
        try:
            results += fn(min(limit, left), dry=dry)
        except Exception as exc:  # noqa: BLE001 - a broken step is reported, the others still run
            results.append({"step": name, "status": "FAILED", "detail": f"{type(exc).__name__}: {exc}"[:160]})
    total = time.time() - t_start
    results.append({"step": "total", "status": "", "seconds": total, "detail": f"budget {BUDGET_S} s"})
    table = summary_table(results)
    print("\n" + table)
    with open(args.results, "a") as f:
        f.write(f"\n## make gpu-check{' --dry-run (CPU: no GPU work)' if dry else ''} — {header}\n\n"
                f"{table}\n")
    print(f"(summary appended to {args.results})")
    bad = [r for r in results if r["status"].startswith(("FAILED", "TIMEOUT"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
