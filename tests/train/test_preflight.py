"""Preflight: every stage's data and the eval files are checked on rank 0 before the model loads,
so a bad file in the LAST stage fails before the first step, printed once (2 ranks too);
epochs -> steps; data.fields from a TOML recipe."""
from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from staged import preflight
from staged.config import BatchConfig, StageConfig, from_dict, load_config
from train_helpers import child_env, train_cmd

TOML = """
model = "embedded"
embedded_dir = "{embedded}"
output_dir = "{out}"
tensorboard = false
plot = false
progress = false

[[stages]]
name = "one"
data = {{ synthetic = "perception", num_samples = 8 }}
steps = 1
batch = {{ prompts_per_step = 2, group_size = 2, micro_batch_size = 4 }}
grpo = {{ max_response_tokens = 4 }}

[[stages]]
name = "last"
data = {{ files = ["{data}"], default_task = "mcq", fields = {{ prompt = "question", answer = "gt" }} }}
epochs = 2
batch = {{ prompts_per_step = 2, group_size = 2, micro_batch_size = 4 }}
grpo = {{ max_response_tokens = 4 }}

[eval]
files = [{eval}]
"""


def _data(tmp_path, n=5, bad_row=None, missing_image=None):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (28, 28)).save(tmp_path / "imgs" / "a.png")
    rows = [{"question": f"<image>q{i}", "gt": "A", "images": ["imgs/a.png"]} for i in range(n)]
    if bad_row is not None:
        rows[bad_row]["gt"] = ""
    if missing_image is not None:
        rows[missing_image]["images"] = ["imgs/gone.png"]
    f = tmp_path / "last.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _cfg(tmp_path, embedded="unused", eval_files=()):
    text = TOML.format(embedded=embedded, out=tmp_path / "out", data=tmp_path / "last.jsonl",
                       eval=", ".join(f'"{e}"' for e in eval_files))
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_fields_from_toml_and_epochs_to_steps(tmp_path):
    _data(tmp_path, n=5)
    cfg = load_config(_cfg(tmp_path))
    assert cfg.stages[1].data.fields == {"prompt": "question", "answer": "gt"}
    assert cfg.stages[1].steps is None and cfg.stages[1].epochs == 2
    rows = preflight.check_data(cfg)
    assert rows == [8, 5]
    preflight.resolve_steps(cfg, rows)
    assert cfg.stages[1].steps == 3 * 2  # ceil(5 / 2) per epoch
    assert cfg.stages[0].steps == 1  # steps given: unchanged


@pytest.mark.parametrize("rows, P, drop_last, epochs, steps", [
    (5, 2, False, 2, 6), (5, 2, True, 2, 4), (4, 2, False, 3, 6), (4, 2, True, 3, 6), (1, 2, False, 1, 1),
    (3200, 512, True, 16, 96), (3200, 512, False, 16, 112),  # the release: floor (drop_last), 6 x 16
])
def test_epochs_to_steps(rows, P, drop_last, epochs, steps):
    s = StageConfig(epochs=epochs, drop_last=drop_last, batch=BatchConfig(prompts_per_step=P))
    assert s.steps_for(rows) == steps


def test_epochs_config_errors():
    with pytest.raises(ValueError, match=r"^stages\[0\]\.epochs: set steps or epochs, not both"):
        from_dict({"stages": [{"name": "s", "steps": 3, "epochs": 1}]})
    with pytest.raises(ValueError, match=r"^stages\[0\]\.data\.fields: unknown field 'question'"):
        from_dict({"stages": [{"name": "s", "data": {"files": ["x.jsonl"], "fields": {"question": "q"}}}]})
    s = StageConfig(epochs=1, drop_last=True, batch=BatchConfig(prompts_per_step=8))
    with pytest.raises(ValueError, match="do not fill one step"):
        s.steps_for(5)


@pytest.mark.parametrize("problem", ["bad_row", "missing_image", "eval"])
def test_a_bad_last_stage_or_eval_file_fails_the_preflight(tmp_path, problem):
    _data(tmp_path, n=5, bad_row=3 if problem == "bad_row" else None,
          missing_image=4 if problem == "missing_image" else None)
    evals = []
    if problem == "eval":
        (tmp_path / "bench.jsonl").write_text('{"problem": "1+1?"}\n')  # no answer column
        evals = [tmp_path / "bench.jsonl"]
    cfg = load_config(_cfg(tmp_path, eval_files=evals))
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check_data(cfg)
    msg = str(e.value)
    expected = {"bad_row": "stages[1] 'last': " + f"{tmp_path / 'last.jsonl'}:4: field 'gt': empty answer",
                "missing_image": f"{tmp_path / 'last.jsonl'}:5: field 'images'[0]: file not found: imgs/gone.png",
                "eval": f"eval.files: {tmp_path / 'bench.jsonl'}: field 'answer'"}[problem]
    assert expected in msg, msg
    assert e.value.one_message  # printed as one line by the CLI, no traceback


@pytest.mark.slow
def test_two_ranks_fail_before_the_model_loads_and_say_it_once(tmp_path, embedded_dir):
    """The last stage's file has a bad row: torchrun with 2 ranks exits 2 before any model is
    loaded (no embedded checkpoint is built, no step runs), the message printed once."""
    _data(tmp_path, n=5, bad_row=3)
    cfg = _cfg(tmp_path, embedded=tmp_path / "never-built")
    p = subprocess.run(train_cmd(2) + ["--config", str(cfg)], cwd=tmp_path, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert out.count("field 'gt': empty answer") == 1, out[-6000:]
    assert "staged/" not in out and "PreflightError" not in out, out[-6000:]  # no traceback of ours
    # (torchrun prints its own ChildFailedError traceback for a child's non-zero exit)
    assert not (tmp_path / "never-built").exists()  # the model was never built or loaded
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("world", [1, 2])
def test_drop_last_epochs_are_whole_steps_of_a_fresh_permutation(world):
    """drop_last: 5 rows, 2 per step -> 2 steps per epoch, each epoch 4 distinct rows of its own
    permutation (the 5th left out); without it the rows form one stream over epochs (as before)."""
    import torch

    from staged.data import Sample
    from staged.parallel import Dist
    from staged.train import epoch_order, step_prompts

    rows = [Sample(f"q{i}", "A", "mcq") for i in range(5)]
    ranks = [Dist(r, world, r, torch.device("cpu"), None) for r in range(world)]

    def prompts(stage, step):
        return [s.prompt for d in ranks for _, s in step_prompts(rows, stage, 0, 0, step, d)]

    stage = StageConfig(epochs=3, drop_last=True, batch=BatchConfig(prompts_per_step=2))
    stage.resolve_steps(len(rows))
    assert stage.steps == 6
    for e in range(3):
        order = [f"q{i}" for i in epoch_order(rows, stage, 0, 0, e)]
        got = prompts(stage, 2 * e) + prompts(stage, 2 * e + 1)
        assert got == order[:4] and len(set(got)) == 4
    stream = StageConfig(steps=6, batch=BatchConfig(prompts_per_step=2))
    flat = [f"q{i}" for e in range(3) for i in epoch_order(rows, stream, 0, 0, e)]
    assert [p for step in range(6) for p in prompts(stream, step)] == flat[:12]


def test_epochs_and_max_prompt_tokens_end_to_end(tmp_path, embedded_dir):
    """One process, a file stage with epochs and data.max_prompt_tokens: the overlong row is dropped
    by the preflight's count and by the stage's load alike, so steps = ceil(4 / 2) x 1 = 2 run."""
    from train_helpers import read_records, run_train

    _data(tmp_path, n=5)
    f = tmp_path / "last.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    rows[2]["question"] = "<image>" + "why " * 400  # ~400 more prompt tokens than the others
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, embedded=embedded_dir)
    text = cfg.read_text().replace('fields = { prompt = "question", answer = "gt" } }',
                                   'fields = { prompt = "question", answer = "gt" }, max_prompt_tokens = 200 }')
    text = text.replace("epochs = 2", "epochs = 1")
    cfg.write_text(text)
    p = run_train(["--config", str(cfg), "stages.0.data.num_samples=4", "export_hf=false"], cwd=tmp_path)
    grpo = [r for r in read_records(tmp_path / "out") if r.get("stage") == 1 and r.get("kind") == "grpo"]
    assert len(grpo) == 2, grpo
    assert "1 rows dropped" in p.stdout and "4 rows, 2 steps per epoch x 1 epochs = 2 steps" in p.stdout, p.stdout[-3000:]
    assert "(grpo): 2 steps, 4 samples" in p.stdout, p.stdout[-3000:]  # the stage loaded the same 4 rows
