"""The embedded default learns: in every stage the mean reward over the last GRPO steps exceeds
the mean over the first ones (the summary's start/end, 20% windows; format warm-up excluded).

This runs the shipped default with its own step counts (only exports, plots and TensorBoard are
off): shortening a stage changes every later stage's trajectory, and the shorter variants we
measured learned less reliably. CPU runs are deterministic, so this checks one fixed trajectory
per machine -- but not the same one on every machine: CPUs round differently (AVX2 / AVX-512
kernels), and a recipe that rose on a Xeon collapsed in its visual stage on an EPYC. The default
was chosen to rise in every stage at each of seeds 0-8 (staged/configs/default.toml), so that the
trajectory a given machine draws is one of many that pass, not the one that happened to.
"""
import pytest

from train_helpers import read_records, run_train
from staged.metrics import stage_summary


@pytest.mark.slow
def test_default_run_improves_reward_in_every_stage(tmp_path, embedded_dir):
    out = tmp_path / "out"
    res = run_train([f"embedded_dir={embedded_dir}", f"output_dir={out}", "export_hf=false",
                     "tensorboard=false", "plot=false"], cwd=tmp_path, timeout=600)
    rows = stage_summary(read_records(out), ["perception", "textual", "visual"])
    for row in rows:
        assert row["steps"] >= 20, row
        assert row["reward_end"] > row["reward_start"], row
    assert "reward start→end" in res.stdout  # the summary table is printed
