"""Kill -9 in the middle of a stage, resume, and the run continues bit-identically: the per-step
metrics (timings aside) and the final weights equal those of an uninterrupted run."""
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import (STAGE_DIRS, child_env, deterministic, read_records, run_train, train_cmd,
                           write_tiny_config)
from staged import checkpoint


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path, warm_model, reference_run):
    out = tmp_path / "out"
    cfg = write_tiny_config(tmp_path / "tiny.toml", out, warm_model)
    # Kill once step 4 (the last GRPO step of the "perception" stage, after the checkpoint at 3)
    # has been logged: mid-stage, with a reference model, optimizer state and a partial log to undo.
    p = subprocess.Popen(train_cmd() + ["--config", str(cfg)], cwd=tmp_path, env=child_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if p.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {p.stderr.read()[-3000:]}")
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the run did not reach step 4 in time")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    ckpt = checkpoint.latest(out / "checkpoints")
    assert ckpt is not None and checkpoint.read_trainer_state(ckpt)["stage_name"] == "perception"
    assert 3 <= checkpoint.read_trainer_state(ckpt)["global_step"] < 9

    # A half-written checkpoint must never be picked up.
    fake = out / "checkpoints" / ".tmp-step-00000008"
    fake.mkdir()
    (fake / "trainer_state.json").write_text("{}")

    res = run_train(["--config", str(cfg)], cwd=tmp_path)
    assert "resuming from" in res.stdout
    assert not fake.exists()

    ref, got = read_records(reference_run), read_records(out)
    assert [deterministic(r) for r in got] == [deterministic(r) for r in ref]
    for stage_dir in STAGE_DIRS:
        a = load_file(str(reference_run / "hf" / stage_dir / "model.safetensors"))
        b = load_file(str(out / "hf" / stage_dir / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stage_dir


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    root = tmp_path / "ck"
    (root / "step-00000004").mkdir(parents=True)
    (root / "step-00000004" / "trainer_state.json").write_text("{}")
    (root / "step-00000009").mkdir()                      # no trainer_state.json: not complete
    (root / ".tmp-step-00000012").mkdir()
    (root / ".tmp-step-00000012" / "trainer_state.json").write_text("{}")
    assert checkpoint.latest(root) == root / "step-00000004"
    assert checkpoint.latest(tmp_path / "missing") is None
