"""The benchmark runner and ``make gpu-check``, on a CPU, in well under a minute.

* ``python -m benchmarks --list`` names every benchmark module;
* ``--only planner --no-record --quick`` runs end to end (table, plot, JSON) and leaves
  benchmarks/RESULTS.md alone;
* ``python -m benchmarks.gpu_check`` without a GPU says so and exits 0;
* the training commands the benchmarks build (the GPU smoke run's overrides, the train-step
  benchmark's config) are valid trainer configurations: an unknown key would only show on a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_list_names_every_benchmark():
    from benchmarks.__main__ import BENCHMARKS

    p = _run("-m", "benchmarks", "--list")
    assert p.returncode == 0, p.stderr
    listed = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    assert listed == list(BENCHMARKS), p.stdout
    assert all(len(line.split(maxsplit=1)) == 2 for line in p.stdout.splitlines()), "a benchmark without a summary"


def test_quick_planner_run_prints_a_table_and_records_nothing(tmp_path):
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    out = tmp_path / "rows.json"
    p = _run("-m", "benchmarks", "--only", "planner", "--no-record", "--quick", "--json", str(out),
             "--plot-dir", str(tmp_path / "plots"), "--device", "cpu")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "| case | impl | median_ms | p20_ms | p80_ms |" in p.stdout
    assert "quick" in p.stdout.splitlines()[0]
    rows = json.loads(out.read_text())["benchmarks"]["planner"]["rows"]
    assert rows and all(r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows)
    if rows and any(r["impl"] == "python" for r in rows):
        assert all(r["speedup_vs_python"] > 0 for r in rows)
    assert (results.read_bytes() if results.exists() else None) == before, "--no-record wrote RESULTS.md"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "plots" / "planner-cpu-quick.png").stat().st_size > 1000


def test_unknown_benchmark_is_an_error_naming_it():
    p = _run("-m", "benchmarks", "--only", "nope", "--no-record")
    assert p.returncode != 0 and "nope" in p.stderr


def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: `make gpu-check` runs the real check")
    p = _run("-m", "benchmarks.gpu_check", timeout=30)
    assert p.returncode == 0, p.stderr
    assert "no CUDA GPU" in p.stdout


def test_gpu_check_dry_run_runs_every_step_up_to_cuda(tmp_path):
    """`make gpu-check GPU_CHECK_ARGS=--dry-run`: the test selection collects, the benchmark
    modules import, the training overrides parse, and the summary table is appended to the
    results file (here a temporary one). ~25 s on 2 cores (pytest collection dominates)."""
    results = tmp_path / "RESULTS.md"
    p = _run("-m", "benchmarks.gpu_check", "--dry-run", "--results", str(results), timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("| step | status |"):]
    for step in ("cuda tests", "microbenchmarks", "train smoke", "total"):
        assert f"| {step}" in table, table
    assert table.count("dry-run ok") == 3, table
    assert " tests collected" in table or " collected" in table
    text = results.read_text()
    assert "## make gpu-check --dry-run" in text and "torch " in text and "| step | status |" in text


def test_gpu_check_fits_its_budget():
    from benchmarks import gpu_check

    assert gpu_check.BUDGET_S < 8 * 60
    assert sum(limit for _, _, limit, _ in gpu_check.STEPS) <= gpu_check.BUDGET_S + 60


def test_gpu_smoke_run_overrides_are_a_valid_short_config():
    from benchmarks.gpu_check import TRAIN_OVERRIDES
    from staged.config import load_config

    cfg = load_config(None, ["attn_implementation=sdpa", *TRAIN_OVERRIDES])
    assert cfg.device == "cuda" and cfg.precision == "bf16" and cfg.resume == "never"
    assert len(cfg.stages) == 3 and sum(s.steps for s in cfg.stages) <= 12
    assert any(s.steps > s.sft_warmup_steps for s in cfg.stages), "the smoke run must take GRPO steps"


def test_train_step_config_matches_the_trl_side():
    from benchmarks import bench_train_step as B

    for shape in B.SHAPES.values():
        cfg = B.staged_config("/nonexistent/model", "/nonexistent/out", "cpu", 7, shape=shape)
        (st,) = cfg.stages
        assert cfg.model == "/nonexistent/model"
        assert st.steps == 7 and st.type == "grpo" and st.sft_warmup_steps == 0
        assert st.batch.prompts_per_step == shape.prompts and st.batch.group_size == shape.group
        assert st.batch.micro_batch_size == shape.prompts * shape.group          # one micro-batch, like TRL's
        assert st.grpo.max_response_tokens == shape.max_new and st.grpo.beta == 0.0 and st.grpo.loss_type == "grpo"
        assert st.lr == B.LR and cfg.cpu_threads == 1 and st.data.seed == B.DATA_SEED
    assert B.SHAPES["realistic"].vocab_size == 151_936
    if B._has_packing():
        assert B.staged_config("/m", "/o", "cpu", 3, packed=True).packing.enabled


def test_common_helpers():
    from benchmarks.common import markdown_table, peak_rss_mb, quantiles_ms
    from benchmarks.gpu_check import bench_headline, summary_table

    q = quantiles_ms([5.0, 1.0, 3.0, 2.0, 4.0])
    assert q["median_ms"] == 3.0 and q["p20_ms"] <= 3.0 <= q["p80_ms"]
    assert peak_rss_mb() > 10
    t = markdown_table([{"case": "a", "impl": "x", "median_ms": 1.5}, {"case": "a", "impl": "y", "note": "n/a"}])
    assert t.splitlines()[0] == "| case | impl | median_ms | note |" and len(t.splitlines()) == 4
    rows = [{"impl": "eager", "pass": "fwd+bwd", "speedup_vs_eager": 1.0},
            {"impl": "staged", "pass": "fwd", "speedup_vs_eager": 9.0},
            {"impl": "staged", "pass": "fwd+bwd", "speedup_vs_eager": 2.0},
            {"impl": "liger", "note": "skipped: liger not installed"}]
    h = bench_headline(rows)
    assert "speedup_vs_eager 2x" in h and "skipped" in h
    assert "| a | ok | 3 | x/y |" in summary_table([{"step": "a", "status": "ok", "seconds": 3.2, "detail": "x|y"}])


def test_quick_rollout_benchmark_runs_every_engine():
    """The rollout benchmark's quick shape: the three implementations, same completion-token
    accounting, the paged engine's prefill/decode split."""
    from benchmarks.bench_rollout import run

    rows = run("cpu", quick=True)
    assert [r["impl"] for r in rows] == ["paged", "simple (old loop)", "round-1 loop", "transformers generate()"]
    assert all(r["completion_tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["prefill_ms"] > 0 and rows[0]["decode_ms"] > 0 and rows[0]["cache_mb"] > 0
    assert rows[0]["completion_tokens"] == rows[1]["completion_tokens"] == rows[2]["completion_tokens"]
    assert rows[0]["same_alone"] == "3/3"  # rows decoded alone: the batch's tokens (exact on a CPU)
    if sys.platform.startswith("linux"):
        assert all(r["peak_extra_mb"] >= 0 for r in rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the RSS high-water mark reset is Linux's")
def test_peak_extra_rss_sees_a_phase_whose_memory_an_earlier_phase_freed():
    """The rollout rows' host memory: the peak of a block above the memory before it. Small
    tensors come from malloc's heap, which keeps freed pages: without the trim a second identical
    phase would read ~0 MiB."""
    from benchmarks.common import PeakExtraRSS

    def phase():
        xs = [torch.ones(4096) for _ in range(12_800)]  # 12,800 x 16 KiB = 200 MiB of small blocks
        return len(xs)

    seen = []
    for _ in range(2):
        with PeakExtraRSS() as m:
            phase()
        seen.append(m.mb)
    assert all(180 <= mb <= 260 for mb in seen), seen


def test_gpu_check_headline_puts_the_tma_forward_beside_cp_async():
    """On sm_90 the log-prob benchmark times tma=True beside the cp.async forward; the summary
    line carries the ratio the first GPU session decides the default by."""
    from benchmarks.gpu_check import bench_headline

    rows = [{"impl": "staged", "pass": "fwd+bwd", "x_gemm": 1.9},
            {"impl": "staged (tma)", "pass": "fwd", "vs_cp_async": 0.9},
            {"impl": "staged (tma)", "pass": "fwd+bwd", "vs_cp_async": 0.95},
            {"impl": "staged (tma)", "pass": "fwd+bwd", "vs_cp_async": 1.05}]
    head = bench_headline(rows)
    assert "x_gemm 1.9x" in head
    assert "tma/cp.async fwd 0.9x" in head and "tma/cp.async fwd+bwd 0.95-1.05x" in head


def test_rollout_read_bound_counts_the_weights_a_decode_step_reads():
    """The decode floor counts the decoder layers and the lm_head, not the vision tower nor the
    input embedding table (a step reads a row of it per token); a tied head once."""
    from benchmarks.bench_rollout import decode_weight_bytes
    from benchmarks.bench_rollout_at_scale import AT_SCALE_TINY, build_text_model

    model = build_text_model("cpu", torch.float32, AT_SCALE_TINY, 500)
    layers = model.model.language_model.layers
    want = 4 * (sum(p.numel() for p in layers.parameters()) + model.model.language_model.norm.weight.numel()
                + model.lm_head.weight.numel())
    assert decode_weight_bytes(model) == want
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tied
    assert decode_weight_bytes(model) == want


def test_rollout_read_bound_is_weights_once_per_step_and_the_kv_over_the_steady_steps():
    """% of the floor: weights once per decode step + the live KV, over the steps that captured no
    CUDA graph where the engine reports them (a capture is a one-off cost, not a step's)."""
    from benchmarks.bench_rollout import read_bound_pct

    stats = {"decode_steps": 10, "kv_tokens_read": 1000, "kv_bytes_per_token": 64, "decode_s": 2.0}
    # (10 * 1e6 + 1000 * 64) bytes in 2 s at 1 GB/s
    assert read_bound_pct(10**6, stats, 1.0) == pytest.approx(100 * (10 * 10**6 + 64_000) / 1e9 / 2.0)
    stats.update(steady_decode_steps=8, steady_kv_tokens_read=900, steady_decode_s=1.0)
    assert read_bound_pct(10**6, stats, 1.0) == pytest.approx(100 * (8 * 10**6 + 900 * 64) / 1e9 / 1.0)


def test_decode_clock_keeps_graph_capturing_steps_apart():
    from staged.rollout.engine import DecodeClock

    clock = DecodeClock(torch.device("cpu"))
    for kv, captured in ((5, True), (7, False), (9, False)):
        clock.stop(clock.start(), kv, captured)
    t = clock.totals()
    assert t["steady_decode_steps"] == 2 and t["steady_kv_tokens_read"] == 16
    assert 0 <= t["steady_decode_s"] <= t["decode_s"]


def test_rollout_at_scale_case_runs_on_tiny_dims():
    """make gpu-check's decode-at-scale rows (7B-layer shapes on CUDA), on tiny dims on a CPU: the
    rows come out with their read-bound %, one token per row per step; on a CPU the full-size
    benchmark says it is a GPU one."""
    from benchmarks.bench_rollout_at_scale import AT_SCALE_TINY, decode_at_scale, run

    rows = decode_at_scale("cpu", torch.float32, {"copy_gbps": 10.0}, dims=AT_SCALE_TINY, vocab=300,
                           row_counts=(6,), prompt_len=9, new=5)
    assert [r["impl"] for r in rows] == ["paged"]
    r = rows[0]
    assert r["completion_tokens"] == 6 * 5
    assert r["pct_of_read_bound"] > 0 and r["decode_step_ms"] > 0
    assert run("cpu")[0]["note"].startswith("n/a")
