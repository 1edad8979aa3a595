"""FSDP2 on 2 ranks (gloo, CPU, torchrun, activation checkpointing on) computes what 1 process
computes: the same per-step losses, rewards and gradient norms, and the same weights at every
stage end, within 1e-5 in fp32.

The global batch splits identically (rank r takes prompts r*P/W...), every completion is drawn
from a seed of (run seed, step, global row index), and micro-batch losses are weighted so that
the FSDP mean over ranks is the single-process loss (see staged.grpo)."""

import pytest
import torch

from train_helpers import COMPARED, exported_weights, read_records, run_train, write_tiny_config




@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, embedded_dir, reference_run):
    out = tmp_path / "out"
    cfg = write_tiny_config(tmp_path / "tiny.toml", out, embedded_dir)
    # With activation checkpointing on, too: recomputation in backward changes nothing (on one
    # process it is bit-identical), so the 2-rank run must still match the plain 1-process run.
    run_train(["--config", str(cfg), "fsdp.activation_checkpointing=true"], nproc=2, cwd=tmp_path)

    one, two = read_records(reference_run), read_records(out)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 28))
    assert any(r.get("reward", 0) > 0 for r in one), "the test config should produce non-zero rewards"
    for a, b in zip(one, two):
        for k in COMPARED:
            if k in a:
                assert b[k] == pytest.approx(a[k], abs=1e-5, rel=1e-5), (a["step"], k, a[k], b[k])

    for stage_dir in ("stage0-warmup", "stage1-perception", "stage2-frozen-vision"):
        w1, w2 = exported_weights(reference_run, stage_dir), exported_weights(out, stage_dir)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=lambda m: f"{stage_dir} {k}: {m}")
