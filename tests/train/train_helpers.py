"""Helpers of the trainer tests: a tiny run config, a subprocess runner (plain python or torchrun)
and JSONL readers. (A module of its own: ``conftest`` is not importable by name.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

def run_header(seed: int, checkpoint_every: int = 0) -> str:
    """The top of a test run's TOML (``model`` and ``out`` filled in by .format later): no
    tensorboard, plot or progress bar, no checkpoints kept beyond the run."""
    return (f'model = "{{model}}"\noutput_dir = "{{out}}"\nseed = {seed}\n'
            f"checkpoint_every = {checkpoint_every}\nkeep_checkpoints = 0\n"
            "tensorboard = false\nplot = false\nprogress = false\n")


# The compared runs start from a *warm* checkpoint: the embedded model after a short caption
# SFT at a high lr (WARMUP_TOML, run once, on one process) so that GRPO earns non-zero rewards.
# The warm-up is not part of the runs that 1-vs-2-rank tests compare: Adam turns the last-bit
# differences of a reduce-scatter (which depend on the CPU's vector unit) into steps of up to lr
# on weights whose gradient is ~0, so 20 steps at lr 3e-3 drift apart by ~1e-3 on some machines.
# Started from the same bytes, the first compared step is exact up to reduction order, and the
# drift after it is bounded by the lr taken so far (see drift_tolerance).
WARMUP_TOML = """
model = "embedded"
embedded_dir = "{embedded}"
output_dir = "{out}"
seed = 3
checkpoint_every = 0
keep_checkpoints = 0
tensorboard = false
plot = false
progress = false

[[stages]]
name = "warmup"
type = "sft"
data = {{ synthetic = "perception", num_samples = 256 }}
steps = 20
lr = 3e-3
batch = {{ prompts_per_step = 8, group_size = 1, micro_batch_size = 4 }}
"""

# Three stages that exercise every path in a few seconds: GRPO with a KL reference model
# (beta > 0) and several micro-batches (first, so that the first compared step is a GRPO step
# from identical weights), GRPO with dapo's global token normaliser and no std normalisation on
# a frozen vision tower, and an sft stage. Small lrs keep the drift between runs small.
TINY_TOML = run_header(seed=3, checkpoint_every=3) + """
[[stages]]
name = "perception"
data = {{ synthetic = "perception", num_samples = 64 }}
steps = 4
lr = 1e-5
batch = {{ prompts_per_step = 4, group_size = 4, micro_batch_size = 4 }}
grpo = {{ max_response_tokens = 10, beta = 0.02 }}

[[stages]]
name = "frozen-vision"
data = {{ synthetic = "perception", num_samples = 64, seed = 11 }}
freeze = ["vision"]
steps = 3
lr = 1e-5
batch = {{ prompts_per_step = 4, group_size = 4, micro_batch_size = 8 }}
grpo = {{ max_response_tokens = 10, loss_type = "dapo", std_normalize = false }}

[[stages]]
name = "sft"
type = "sft"
data = {{ synthetic = "perception", num_samples = 64, seed = 5 }}
steps = 2
lr = 1e-5
batch = {{ prompts_per_step = 8, group_size = 1, micro_batch_size = 4 }}
"""
STAGE_DIRS = ("stage0-perception", "stage1-frozen-vision", "stage2-sft")

# Keys whose values differ between otherwise identical runs.
TIMING_KEYS = ("tokens_per_s", "step_time_s", "rollout_time_s", "peak_mem_mb")


def write_tiny_config(path: Path, out: Path, model: Path) -> Path:
    """The compared runs' config; ``model`` is the warm checkpoint (the ``warm_model`` fixture)."""
    path.write_text(TINY_TOML.format(model=model, out=out))
    return path


def warm_up(root: Path, embedded: Path) -> Path:
    """Runs WARMUP_TOML on one process; returns its HF export (model + processor files)."""
    cfg = root / "warmup.toml"
    cfg.write_text(WARMUP_TOML.format(embedded=embedded, out=root / "out"))
    run_train(["--config", str(cfg)], cwd=root)
    return root / "out" / "hf" / "stage0-warmup"


def train_cmd(nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "staged.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "staged.train"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_train(args: list[str], *, nproc: int = 1, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(train_cmd(nproc) + args, cwd=cwd, env=child_env(), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"training run failed (rc {p.returncode}): {' '.join(args)}\n"
                             f"--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-8000:]}")
    return p


# Metrics that a 2-rank run must reproduce from the 1-process run.
COMPARED = ("loss", "grad_norm", "reward", "accuracy", "format", "response_length", "entropy", "kl",
            "clip_ratio", "ratio_mean")


# Tolerances of a 1-vs-N-rank comparison. Runs that start from the same bytes agree at their first
# step up to float reduction order (~1e-7 relative here): TIGHT there catches a wrong normaliser or
# a missing all-reduce (off by a factor, or by the ranks' token-count imbalance: >= 1e-2). After
# that, Adam may move a weight whose gradient is ~0 by up to ~lr per step in a different direction
# on each run, so the allowed difference grows with the lr taken so far: DRIFT_PER_LR was set from
# the measured drift (~0.2 per unit lr on the tiny config, also with the 2-rank run's vector units
# changed: ATEN_CPU_CAPABILITY, MKL and oneDNN at AVX2) with a 100x margin, and stays far below
# what a broken normaliser or a missing all-reduce gives.
TIGHT = 1e-5
DRIFT_PER_LR = 20.0


def drift_tolerance(records: list[dict], i: int) -> float:
    """Allowed relative (and absolute) difference of record ``i`` of a run started from a shared checkpoint."""
    return TIGHT + DRIFT_PER_LR * sum(r["lr"] for r in records[:i])


def assert_runs_match(one: list[dict], two: list[dict]) -> None:
    """Per-step metrics of two runs from the same checkpoint: tight at the first step, then within
    the drift that Adam allows."""
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert any(r.get("reward", 0) > 0 for r in one), "the warm checkpoint should earn non-zero rewards"
    for i, (a, b) in enumerate(zip(one, two)):
        tol = drift_tolerance(one, i)
        for k in COMPARED:
            if k in a:
                assert b[k] == pytest.approx(a[k], abs=tol, rel=tol), (a["step"], k, a[k], b[k], tol)


def assert_exports_match(one: Path, two: Path, stage_dirs=STAGE_DIRS) -> None:
    """Stage-end weights within Adam's bound: each step moves a weight by at most ~lr (x3 for
    Adam's worst case of a shrinking second moment), in opposite directions on the two runs."""
    import torch

    records = read_records(one)
    for s, stage_dir in enumerate(stage_dirs):
        atol = 2 * 3 * sum(r["lr"] for r in records if r["stage"] <= s) + 1e-6
        w1, w2 = exported_weights(one, stage_dir), exported_weights(two, stage_dir)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=atol, rtol=0,
                                       msg=lambda m, k=k, d=stage_dir: f"{d} {k}: {m}")


def exported_weights(out: Path, stage_dir: str) -> dict:
    """The tensors of a stage's HF safetensors export."""
    from safetensors.torch import load_file

    files = sorted((out / "hf" / stage_dir).glob("*.safetensors"))
    assert files, f"no HF export in {out / 'hf' / stage_dir}"
    w = {}
    for f in files:
        w.update(load_file(f))
    return w


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def deterministic(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING_KEYS}
