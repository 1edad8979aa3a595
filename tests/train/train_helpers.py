"""Helpers of the trainer tests: a tiny run config, a subprocess runner (plain python or torchrun)
and JSONL readers. (A module of its own: ``conftest`` is not importable by name.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Three stages that exercise every path in a few seconds: an sft stage (so that GRPO sees
# non-zero rewards), GRPO with a KL reference model (beta > 0) and several micro-batches, and
# GRPO with dapo's global token normaliser and no std normalisation on a frozen vision tower.
# The GRPO stages use a small lr (1e-5) because 1-vs-2-rank equality is checked to 1e-5: Adam turns
# the last-bit differences of a reduce-scatter into steps of up to lr on weights whose gradient is
# ~0, so at lr 1e-3 the two runs drift apart by ~1e-4 within a few steps (not a bug, arithmetic).
TINY_TOML = """
model = "embedded"
embedded_dir = "{embedded}"
output_dir = "{out}"
seed = 3
checkpoint_every = 3
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
"""

# Keys whose values differ between otherwise identical runs.
TIMING_KEYS = ("tokens_per_s", "step_time_s", "rollout_time_s", "peak_mem_mb")


def write_tiny_config(path: Path, out: Path, embedded: Path) -> Path:
    path.write_text(TINY_TOML.format(embedded=embedded, out=out))
    return path


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
