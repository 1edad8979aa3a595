"""Faults end or resume a run with one clear message: a rank that raises mid-stage (2 ranks,
torchrun), a damaged newest checkpoint, a changed stage list. Subprocess runs of a tiny config."""
from __future__ import annotations

import subprocess
import time

import pytest

from train_helpers import child_env, train_cmd

TOML = """
model = "embedded"
embedded_dir = "{embedded}"
output_dir = "{out}"
seed = 3
checkpoint_every = 1
keep_checkpoints = 0
dist_timeout_s = {timeout}
tensorboard = false
plot = false
progress = false
export_hf = false

[[stages]]
name = "perception"
data = {{ synthetic = "perception", num_samples = 16 }}
steps = 2
lr = 1e-5
batch = {{ prompts_per_step = 2, group_size = 2, micro_batch_size = 4 }}
grpo = {{ max_response_tokens = 6 }}

[[stages]]
name = "textual"
data = {{ synthetic = "textual", num_samples = 16 }}
steps = 2
lr = 1e-5
batch = {{ prompts_per_step = 2, group_size = 2, micro_batch_size = 4 }}
grpo = {{ max_response_tokens = 6 }}
"""


def _config(tmp_path, embedded_dir, timeout=600):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML.format(embedded=embedded_dir, out=tmp_path / "out", timeout=timeout))
    return cfg


def _run(args, *, nproc=1, cwd, env=None, timeout=240):
    return subprocess.run(train_cmd(nproc) + args, cwd=cwd, env={**child_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_raising_rank_ends_the_job_with_its_error_once(tmp_path, embedded_dir):
    """Rank 1 raises before global step 1 while rank 0 enters it (its rollout's all-gather). The
    job must end non-zero long before dist_timeout_s, showing the error once."""
    timeout = 120
    cfg = _config(tmp_path, embedded_dir, timeout=timeout)
    t0 = time.monotonic()
    p = _run(["--config", str(cfg)], nproc=2, cwd=tmp_path, env={"STAGED_INJECT_FAULT": "raise:1:1"},
             timeout=3 * timeout)
    elapsed = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert elapsed < timeout / 2, f"took {elapsed:.0f} s: the ranks waited for the timeout"
    assert out.count("RuntimeError: injected fault") == 1, out[-6000:]  # the traceback, once
    assert "[rank 1] failed:" in out and out.count("Traceback (most recent call last)") <= 2, out[-6000:]
    assert "[rank 0] stopping" in out or "SIGTERM" in out, out[-6000:]  # the others: one line, or torchrun's stop


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_and_a_changed_run_is_refused(tmp_path, embedded_dir):
    cfg = _config(tmp_path, embedded_dir)
    first = _run(["--config", str(cfg)], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    ck = tmp_path / "out" / "checkpoints"
    shard = next((ck / "step-00000004").glob("__0_*.distcp"))
    data = bytearray(shard.read_bytes())
    data[2048:6144] = bytes(4096)  # 4 KB zeroed inside the shard: same size, loads without error
    shard.write_bytes(bytes(data))

    # the damaged newest checkpoint is named and set aside; the step before it is resumed (an
    # allowed change, listed: logging)
    again = _run(["--config", str(cfg), "plot=true"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "step-00000004 is damaged or incomplete" in again.stdout and "checksum mismatch" in again.stdout
    assert "resuming from" in again.stdout and "step-00000003" in again.stdout
    assert "allowed changes since it was saved: plot: False -> True" in again.stdout, again.stdout
    assert (ck / "step-00000004").is_dir() and (ck / "damaged-step-00000004").is_dir()

    # a changed stage list: one message, no traceback, exit 2, and nothing trained or deleted
    refused = _run(["--config", str(cfg), "stages.0.name=looking"], cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-4000:]
    assert "cannot resume from" in refused.stderr and "stages:" in refused.stderr
    assert "resume=never" in refused.stderr and "Traceback" not in refused.stderr
    assert (ck / "step-00000004").is_dir()
