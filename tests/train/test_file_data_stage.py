"""A stage trained from local files in the paper's release format (EasyR1 rows: ``problem`` with
``<image>`` markers, ``answer``, ``images`` as paths relative to an image dir) runs end to end,
and a malformed row stops the run with an error naming file, line and field."""
from __future__ import annotations

import json
from pathlib import Path

from train_helpers import read_records, run_train

import pytest

CONFIG = """
model = "embedded"
embedded_dir = "{embedded}"
output_dir = "{out}"
seed = 5
tensorboard = false
plot = false
progress = false

[[stages]]
name = "perception-from-files"
data = {{ files = ["{data}"], image_dir = "{images}" }}
steps = 5                 # 2 SFT warm-up steps + 3 GRPO steps
sft_warmup_steps = 2
lr = 1e-4
batch = {{ prompts_per_step = 4, group_size = 4, micro_batch_size = 8 }}
grpo = {{ max_response_tokens = 10 }}
"""


def write_easyr1_rows(root: Path, n: int) -> tuple[Path, Path]:
    from staged.data.synthetic import make_synthetic_dataset

    images = root / "images"
    images.mkdir()
    rows = []
    for i, s in enumerate(make_synthetic_dataset("perception", n, seed=7)):
        names = []
        for j, img in enumerate(s.images):
            names.append(f"p{i}_{j}.png")
            img.save(images / names[-1])
        rows.append({"problem": "<image>" * len(names) + s.prompt.replace("<image>", ""),
                     "answer": s.answer, "images": names, "task": s.task,
                     "pass_rate": s.pass_rate, "reference_response": s.reference_response})
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, images


def test_easyr1_jsonl_with_images_on_disk_trains_a_stage(tmp_path, embedded_dir):
    data, images = write_easyr1_rows(tmp_path, 16)
    out = tmp_path / "out"
    cfg = tmp_path / "files.toml"
    cfg.write_text(CONFIG.format(embedded=embedded_dir, out=out, data=data, images=images))
    run_train(["--config", str(cfg)], cwd=tmp_path)
    grpo = [r for r in read_records(out) if "reward" in r]
    assert len(grpo) == 3, f"expected 3 GRPO steps in metrics.jsonl, got {len(grpo)}"
    assert all(0.0 <= r["reward"] <= 1.0 for r in grpo)
    assert (out / "hf" / "stage0-perception-from-files" / "config.json").exists()


def test_missing_image_is_an_error_naming_file_line_and_field(tmp_path, embedded_dir):
    data, images = write_easyr1_rows(tmp_path, 4)
    lines = data.read_text().splitlines()
    row = json.loads(lines[2])
    row["images"] = ["does_not_exist.png"]
    lines[2] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cfg = tmp_path / "files.toml"
    cfg.write_text(CONFIG.format(embedded=embedded_dir, out=out, data=data, images=images))
    with pytest.raises(AssertionError, match=r"train\.jsonl:3: field 'images'"):
        run_train(["--config", str(cfg)], cwd=tmp_path)
