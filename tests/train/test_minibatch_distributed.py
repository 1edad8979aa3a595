"""Mini-batch updates on 2 ranks (FSDP2, gloo, torchrun) compute what 1 process computes: the tiny
config with 2 mini-batches x 2 epochs in both GRPO stages (grpo with a KL reference, then dapo on a
frozen tower), packed. The ranks hold the same global mini-batches (prompt i -> mini-batch i mod K),
run the same number of micro-batches in each (FSDP collectives line up) and normalise each update
over the mini-batch's global rows / tokens: tight at the first update, then within Adam's drift."""
import pytest
import torch

from train_helpers import (STAGE_DIRS, assert_runs_match, drift_tolerance, exported_weights, read_records,
                           run_train, write_tiny_config)

OVERRIDES = ["packing.enabled=true"] + [f"stages.{s}.{k}" for s in (0, 1) for k in
                                         ("batch.mini_batch_prompts=2", "grpo.ppo_epochs=2")]


@pytest.mark.slow
def test_two_ranks_mini_batches_match_one_process(tmp_path, warm_model):
    outs = {}
    for nproc in (1, 2):
        root = tmp_path / f"n{nproc}"
        root.mkdir()
        cfg = write_tiny_config(root / "tiny.toml", root / "out", warm_model)
        run_train(["--config", str(cfg), *OVERRIDES], nproc=nproc, cwd=root)
        outs[nproc] = root / "out"
    one, two = read_records(outs[1]), read_records(outs[2])
    assert [r.get("updates", 1) for r in one] == [4] * 7 + [1] * 2  # two GRPO stages, then sft
    assert_runs_match(one, two)
    first = one[0]["loss_updates"], two[0]["loss_updates"]
    assert first[1][0] == pytest.approx(first[0][0], rel=1e-5, abs=1e-6)  # the first update: same weights
    for i, (a, b) in enumerate(zip(one, two)):
        tol = drift_tolerance(one, i) * a.get("updates", 1)
        for k in ("loss_updates", "clip_ratio_updates", "ratio_mean_updates"):
            if k in a:
                assert b[k] == pytest.approx(a[k], abs=tol, rel=tol), (a["step"], k, a[k], b[k])
    for s, stage_dir in enumerate(STAGE_DIRS):  # Adam moves a weight by <= ~3 lr per update
        atol = 2 * 3 * sum(r["lr"] * r.get("updates", 1) for r in one if r["stage"] <= s) + 1e-6
        w1, w2 = exported_weights(outs[1], stage_dir), exported_weights(outs[2], stage_dir)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{stage_dir} {k}: {m}")
