"""Resume only what is ours: the run identity, the output_dir lock, writable dirs checked up front
(staged.resume); and the smaller trainer pieces of issue 11 (vocabulary mask, export dtype, plain
progress, TensorBoard purge). Unit tests, no training run."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from staged import checkpoint, resume
from staged.config import load_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A stand-in weights dir: the fingerprint only reads files (two shards + an index)."""
    d = tmp_path_factory.mktemp("model")
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        (d / f"model-{i}.safetensors").write_bytes(torch.randn(50_000, generator=g).numpy().tobytes())
    (d / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (d / "config.json").write_text('{"dtype": "bfloat16"}')
    return d


def _identity(model_dir, *overrides):
    return resume.run_identity(load_config(None, list(overrides)), model_dir)


def test_fingerprint_sees_other_weights_not_a_copy(model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)  # new mtimes, same bytes: the same model
    assert resume.model_fingerprint(copy) == resume.model_fingerprint(model_dir)
    f = copy / "model-1.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2: len(b) // 2 + 8] = b"\x00" * 8  # same names, same sizes: another fine-tune
    f.write_bytes(bytes(b))
    assert resume.model_fingerprint(copy) != resume.model_fingerprint(model_dir)


def test_identity_refuses_what_changes_training(model_dir, tmp_path):
    saved = _identity(model_dir)
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    (other / "model-0.safetensors").write_bytes(b"\x01" * (other / "model-0.safetensors").stat().st_size)
    cases = {
        "model": (resume.run_identity(load_config(None, []), other), "weights fingerprint"),
        "stage list": (_identity(model_dir, "stages.1.name=other"), "stages: the checkpoint's run has"),
        "stage type": (_identity(model_dir, "stages.2.type=sft"), "stages:"),
        "lr": (_identity(model_dir, "stages.0.lr=5e-5"), "stages[0].lr"),
        "steps of the current stage": (_identity(model_dir, "stages.1.steps=30"), "stages[1].steps"),
        "seed": (_identity(model_dir, "seed=9"), "seed: 0 -> 9"),
    }
    for name, (current, expect) in cases.items():
        unsafe, _ = resume.compare_identity(saved, current, stage=1)
        assert unsafe and any(expect in u for u in unsafe), (name, unsafe)


def test_identity_allows_and_lists_safe_changes(model_dir, tmp_path):
    saved = _identity(model_dir)
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    current = resume.run_identity(load_config(None, ["stages.2.steps=99", "eval.n=3", "tensorboard=false",
                                                     "checkpoint_every=5", "dist_timeout_s=30"]), moved)
    unsafe, safe = resume.compare_identity(saved, current, stage=1)
    assert unsafe == []
    assert any("stages[2].steps" in s for s in safe) and any("same weights" in s for s in safe)
    assert saved["config_hash"] == current["config_hash"] or "stages[2].steps" in " ".join(safe)


def test_fields_added_since_the_checkpoint_are_allowed_at_their_default(model_dir):
    """A checkpoint written before a config field existed resumes when the field has its default
    (which reproduces what the old code did), and is refused when it does not."""
    saved = _identity(model_dir)
    for k in ("stages[0].batch.mini_batch_prompts", "stages[1].grpo.ppo_epochs", "stages[2].grpo.dual_clip",
              "stages[0].grpo.dual_clip"):
        del saved["config"][k]
    unsafe, _ = resume.compare_identity(saved, _identity(model_dir), stage=1)
    assert unsafe == []
    unsafe, _ = resume.compare_identity(saved, _identity(model_dir, "stages.1.grpo.ppo_epochs=2"), stage=1)
    assert any(u.startswith("stages[1].grpo.ppo_epochs: '<unset>' -> 2") for u in unsafe), unsafe


def test_check_resume_message_says_how_to_start_over(model_dir, tmp_path):
    state = {"stage": 0, "identity": _identity(model_dir)}
    with pytest.raises(resume.RefuseStart) as e:
        resume.check_resume(tmp_path / "step-00000004", state, _identity(model_dir, "stages.0.name=x"),
                            tmp_path / "ck", tmp_path)
    msg = str(e.value)
    assert "resume=never" in msg and "output_dir" in msg and "step-00000004" in msg


def test_lock_refuses_a_second_live_run_and_takes_over_a_dead_ones(tmp_path):
    first = resume.RunLock(tmp_path).acquire()
    with pytest.raises(resume.RefuseStart, match="in use by a live run"):
        resume.RunLock(tmp_path).acquire()
    first.release()
    resume.RunLock(tmp_path).acquire().release()
    # a run killed with -9 leaves its lock file; the kernel dropped its flock, so it is taken over
    code = (f"import sys, time; sys.path.insert(0, {str(resume.__file__.rsplit('/', 2)[0])!r}); "
            f"from staged.resume import RunLock; lk = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
            f"time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(resume.RefuseStart, match=f"pid {p.pid}"):
            resume.RunLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (tmp_path / resume.LOCK_FILE).exists()
    resume.RunLock(tmp_path).acquire().release()


def test_unwritable_dir_refused_before_anything_loads(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a directory below a file cannot be created, even by root
    with pytest.raises(resume.RefuseStart, match=f"{blocker}/ck is not writable"):
        resume.check_writable(tmp_path / "out", blocker / "ck")


def test_vocab_mask_matches_the_sampler():
    """The trainer's log-probs with VocabMask equal a log-softmax over logits masked exactly as
    staged.rollout.sample_tokens masks them (-inf on suppressed rows), entropy included."""
    from staged.grpo import VocabMask
    from staged.kernels import fused_linear_logprob

    torch.manual_seed(0)
    V, H, N = 41, 16, 23
    h, w = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    suppress = [3, 7, *range(33, V)]  # two placeholders inside, a padded tail
    keep_ids = [i for i in range(V) if i not in suppress]
    targets = torch.tensor(keep_ids)[torch.randint(len(keep_ids), (N,))]
    vm = VocabMask.build(suppress, V, "cpu")
    assert vm.keep == 33 and vm.bias is not None
    wk, tk, b = vm.apply(w, targets)
    z = (h @ w.T) / 0.7
    z[:, suppress] = float("-inf")
    ref = torch.log_softmax(z, -1)
    ref_ent = -(ref.exp() * ref.nan_to_num(neginf=0.0)).sum(-1)
    for dtype, backend, tol in ((torch.float64, "torch", 1e-9), (torch.float32, "auto", 1e-5)):
        logp, ent = fused_linear_logprob(h.to(dtype), wk.to(dtype), tk, temperature=0.7, bias=b,
                                         return_entropy=True, backend=backend)
        assert torch.allclose(logp.double(), ref.gather(1, targets[:, None]).squeeze(1), atol=tol), backend
        assert torch.allclose(ent.double(), ref_ent, atol=tol) and torch.isfinite(ent).all(), backend
    assert VocabMask.build([], V, "cpu") is None


def test_export_dtype_auto_reads_the_source(model_dir, tmp_path):
    assert checkpoint.export_dtype("auto", model_dir) == torch.bfloat16
    assert checkpoint.export_dtype("fp32", model_dir) == torch.float32
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint.export_dtype("auto", tmp_path) == torch.float32


def test_plain_progress_prints_lines():
    import io

    from staged.metrics import PlainProgress

    out = io.StringIO()
    bar = PlainProgress(total=10, initial=0, every=5, file=out)
    for _ in range(10):
        bar.update(1)
        bar.set_postfix({"stage": "p", "reward": "0.5"})
    lines = out.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines] == ["5/10", "10/10"] and "\r" not in out.getvalue()


def test_tensorboard_stage_curves_purged_after_resume(tmp_path):
    """A resume at stage step 2 re-logs steps 3..: TensorBoard must show each step once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from staged.metrics import MetricsLogger

    def run(steps, resume_step):
        lg = MetricsLogger(tmp_path, enabled=True, tensorboard=True, resume_step=resume_step)
        for s in steps:
            lg.log({"step": s, "stage": 0, "stage_name": "p", "stage_step": s, "reward": float(s)})
        lg.close()
        time.sleep(1.1)  # event files are named by the second: keep the two sessions' files apart

    run([1, 2, 3, 4], 0)  # killed after step 4, the checkpoint was at step 2
    run([3, 4, 5], 2)
    for sub, tag in (("tb/stages/p", "stage/reward"), ("tb", "train/reward")):
        acc = EventAccumulator(str(tmp_path / sub))
        acc.Reload()
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5], sub
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
