"""FSDP2 on 2 ranks (gloo, CPU, torchrun, activation checkpointing on) computes what 1 process
computes: from the same warm checkpoint, the same loss, rewards, gradient norm and metrics at the
first step within 1e-5 (fp32), then within the drift Adam allows (train_helpers.drift_tolerance),
and stage-end weights within Adam's bound.

The global batch splits identically (rank r takes prompts r*P/W...), every completion is drawn
from a seed of (run seed, step, global row index), and micro-batch losses are weighted so that
the FSDP mean over ranks is the single-process loss (see staged.grpo)."""

import pytest

from train_helpers import assert_exports_match, assert_runs_match, read_records, run_train, write_tiny_config


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, warm_model, reference_run):
    out = tmp_path / "out"
    cfg = write_tiny_config(tmp_path / "tiny.toml", out, warm_model)
    # With activation checkpointing on, too: recomputation in backward changes nothing (on one
    # process it is bit-identical), so the 2-rank run must still match the plain 1-process run.
    run_train(["--config", str(cfg), "fsdp.activation_checkpointing=true"], nproc=2, cwd=tmp_path)
    one, two = read_records(reference_run), read_records(out)
    assert [r["step"] for r in one] == list(range(1, 10))
    assert_runs_match(one, two)
    assert_exports_match(reference_run, out)
