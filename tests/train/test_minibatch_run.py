"""A staged run with packing, mini-batch updates (2 mini-batches x 2 epochs = 4 updates per
rollout step), a KL reference model, dual-clip (once the loss takes it) and validation every 2 steps
at temperature 0.6 / top-p 0.95 / 2 samples: metrics.jsonl says 4 updates per step with their
clip fractions and holds the evals at the right steps with their sampling settings; a crash right
after a step whose eval was due (checkpoint written, eval not logged) redoes that eval on resume,
a crash in the middle of the stage resumes there, and the whole run then equals an uninterrupted
one bit for bit (metrics and exported weights); the same run without evals trains the same
weights. Subprocess runs from the warm checkpoint."""
from __future__ import annotations

import inspect
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from staged.kernels import grpo_loss
from train_helpers import child_env, deterministic, read_records, run_header, run_train, train_cmd

TOML = run_header(seed=3, checkpoint_every=1) + """packing = {{ enabled = true }}

[eval]
synthetic = ["perception"]
n = 4
max_new_tokens = 6
every = 2
temperature = 0.6
top_p = 0.95
samples = 2

[[stages]]
name = "perception"
data = {{ synthetic = "perception", num_samples = 32 }}
steps = 4
lr = 1e-4
batch = {{ prompts_per_step = 4, group_size = 4, micro_batch_size = 4, mini_batch_prompts = 2 }}
grpo = {{ max_response_tokens = 8, beta = 0.02, ppo_epochs = 2{dual_clip} }}
"""
# dual-clip goes through the loss once staged.kernels.grpo_loss takes it (a keyword of its own)
DUAL_CLIP = ", dual_clip = 3.0" if "dual_clip" in inspect.signature(grpo_loss).parameters else ""


def _config(root, model):
    cfg = root / "run.toml"
    cfg.write_text(TOML.format(model=model, out=root / "out", dual_clip=DUAL_CLIP))
    return cfg


def _crash(cfg, cwd, fault):
    p = subprocess.run(train_cmd() + ["--config", str(cfg)], cwd=cwd, env={**child_env(), "STAGED_INJECT_FAULT": fault},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "injected fault" in p.stderr, (p.stdout[-2000:], p.stderr[-4000:])


def _same(rec):
    return {k: v for k, v in deterministic(rec).items() if k != "eval_seconds"}


@pytest.mark.slow
def test_minibatch_run_with_eval_resumes_exactly(tmp_path, warm_model):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg_a, cfg_b = _config(tmp_path / "a", warm_model), _config(tmp_path / "b", warm_model)
    run_train(["--config", str(cfg_a)], cwd=tmp_path / "a")
    ref = read_records(tmp_path / "a" / "out")

    grpo = [r for r in ref if r["kind"] == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2, 3, 4]
    assert all(r["updates"] == 4 and len(r["clip_ratio_updates"]) == 4 and not r["skipped"] for r in grpo)
    assert any(r["reward"] > 0 for r in grpo), "the warm checkpoint should earn rewards"
    assert all(r["ratio_mean_updates"][0] == 1.0 for r in grpo)  # each step's first update is on-policy
    evals = [r for r in ref if r["kind"] == "eval"]
    assert [(r["step"], r["stage_step"]) for r in evals] == [(2, 2), (4, 4)]  # every 2; step 4 (stage end) once
    for r in evals:
        assert (r["eval_temperature"], r["eval_top_p"], r["eval_samples"]) == (0.6, 0.95, 2)
        assert {"eval/perception/accuracy", "eval/perception/pass@2", "eval/average/accuracy"} <= set(r)

    # B: crash after step 2's checkpoint, before its eval is logged; resume; crash before step 4
    # (mid-stage); resume to the end.
    out_b = tmp_path / "b" / "out"
    _crash(cfg_b, tmp_path / "b", "raise:0:2:eval")
    lost = read_records(out_b)
    assert [(r["kind"], r["step"]) for r in lost] == [("grpo", 1), ("grpo", 2)], "the eval of step 2 was lost"
    _crash(cfg_b, tmp_path / "b", "raise:0:3")
    assert [(r["kind"], r["step"]) for r in read_records(out_b)] == [("grpo", 1), ("grpo", 2), ("eval", 2),
                                                                     ("grpo", 3)]
    res = run_train(["--config", str(cfg_b)], cwd=tmp_path / "b")
    assert "resuming from" in res.stdout
    got = read_records(out_b)
    assert [_same(r) for r in got] == [_same(r) for r in ref]
    assert_same_weights(tmp_path / "a" / "out", out_b)

    # C: the evals change nothing in training (same records but theirs, same weights)
    (tmp_path / "c").mkdir()
    run_train(["--config", str(_config(tmp_path / "c", warm_model)), "eval.every=0", "eval.synthetic=[]"],
              cwd=tmp_path / "c")
    assert [_same(r) for r in read_records(tmp_path / "c" / "out")] == [_same(r) for r in grpo]
    assert_same_weights(tmp_path / "a" / "out", tmp_path / "c" / "out")


def assert_same_weights(one, two):
    a = load_file(str(one / "hf" / "stage0-perception" / "model.safetensors"))
    b = load_file(str(two / "hf" / "stage0-perception" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_records_reach_tensorboard_under_eval(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from staged.metrics import MetricsLogger

    lg = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    lg.log({"step": 2, "stage": 0, "stage_name": "p", "stage_step": 2, "kind": "eval", "eval_temperature": 0.6,
            "eval/perception/accuracy": 0.25, "eval/average/accuracy": 0.25})
    lg.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/perception/accuracy")] == [(2, 0.25)]
    assert "train/eval_temperature" not in acc.Tags()["scalars"]
