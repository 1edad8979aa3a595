"""A non-finite loss or gradient skips the step (no optimizer update, counted in the log); too
many in a row stop the run with an error that says so."""
import json

import pytest
import torch

import staged.train as train_mod

CONFIG = """
model = "embedded"
embedded_dir = "{embedded}"
output_dir = "{out}"
max_consecutive_bad_steps = {bad}
export_hf = false
tensorboard = false
plot = false
progress = false

[[stages]]
name = "perception"
data = {{ synthetic = "perception", num_samples = 16 }}
steps = 4
lr = 1e-3
batch = {{ prompts_per_step = 2, group_size = 2, micro_batch_size = 4 }}
grpo = {{ max_response_tokens = 4 }}
"""


def _run(tmp_path, embedded_dir, monkeypatch, bad, poison_steps):
    calls = {"n": 0}
    real = train_mod.policy_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in poison_steps else loss), metrics

    monkeypatch.setattr(train_mod, "policy_loss", poisoned)
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(embedded=embedded_dir, out=tmp_path / "out", bad=bad))
    train_mod.main(["--config", str(cfg)])


def test_nonfinite_steps_stop_the_run(tmp_path, embedded_dir, monkeypatch):
    with pytest.raises(RuntimeError, match="2 consecutive steps with a non-finite loss"):
        _run(tmp_path, embedded_dir, monkeypatch, bad=2, poison_steps={2, 3})
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, True, True]
    assert not torch.distributed.is_initialized()


def test_an_isolated_bad_step_is_skipped(tmp_path, embedded_dir, monkeypatch):
    _run(tmp_path, embedded_dir, monkeypatch, bad=2, poison_steps={2})
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, True, False, False]
    assert all(r["grad_norm"] == r["grad_norm"] for i, r in enumerate(recs) if i != 1)  # finite elsewhere
