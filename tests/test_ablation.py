"""The ablation baselines (merged, caption SFT) and `python -m staged.ablation`: the recipes load and
keep the staged default's budget, mixed synthetic data, and a --quick ablation end to end."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest

from staged import ablation
from staged.config import DataConfig, StageConfig, load_config


def grpo_steps(cfg) -> int:
    return sum(s.steps - s.sft_warmup_steps for s in cfg.stages if s.type == "grpo")


def warmup_steps(cfg) -> int:
    return sum(s.sft_warmup_steps for s in cfg.stages if s.type == "grpo")


def rollouts(cfg) -> int:
    return sum(s.batch.prompts_per_step * s.batch.group_size * (s.steps - s.sft_warmup_steps)
               for s in cfg.stages if s.type == "grpo")


# ------------------------------------------------------------------------------------------
# recipes


@pytest.mark.parametrize("name", ["merged", "caption_sft", "paper_merged_qwen2_5_vl", "paper_caption_sft_qwen2_5_vl",
                                  "paper_merged_freeze_vision_qwen2_5_vl"])
def test_recipe_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.stages and all(isinstance(s, StageConfig) for s in cfg.stages)


def test_merged_keeps_the_default_budget():
    staged, merged = load_config("default"), load_config("merged")
    (stage,) = merged.stages
    assert stage.data.synthetic == [s.data.synthetic for s in staged.stages]
    assert stage.data.num_samples == staged.stages[0].data.num_samples
    assert grpo_steps(merged) == grpo_steps(staged) == 105
    assert warmup_steps(merged) == warmup_steps(staged) == 115
    assert abs(rollouts(merged) - rollouts(staged)) / rollouts(staged) < 0.01
    assert (merged.model, merged.seed, merged.embedded_dir) == (staged.model, staged.seed, staged.embedded_dir)


def test_caption_sft_replaces_only_the_perception_stage():
    staged, cap = load_config("default"), load_config("caption_sft")
    first = cap.stages[0]
    assert (first.type, first.data.synthetic, first.steps) == ("sft", "caption", staged.stages[0].steps)
    assert [dataclasses.asdict(s) for s in cap.stages[1:]] == [dataclasses.asdict(s) for s in staged.stages[1:]]


def test_paper_variants_mirror_the_paper_recipe():
    paper = load_config("paper_qwen2_5_vl")
    merged, cap = load_config("paper_merged_qwen2_5_vl"), load_config("paper_caption_sft_qwen2_5_vl")
    for cfg in (merged, cap):
        for key in ("model", "precision", "seed", "checkpoint_every", "fsdp"):
            assert getattr(cfg, key) == getattr(paper, key), key
    (m,) = merged.stages
    assert m.epochs == 15 and m.drop_last  # merged_baseline.sh: total_epochs 15 over the merged file
    assert m.data.files == [f for s in paper.stages for f in s.data.files]
    for key in ("lr", "batch", "grpo", "reward", "system_prompt", "prompt_template", "curriculum", "drop_last"):
        assert getattr(m, key) == getattr(paper.stages[0], key), key
    assert (m.data.min_pixels, m.data.max_pixels) == (paper.stages[0].data.min_pixels, paper.stages[0].data.max_pixels)
    assert cap.stages[0].type == "sft" and cap.stages[0].steps == 30
    assert [dataclasses.asdict(s) for s in cap.stages[1:]] == [dataclasses.asdict(s) for s in paper.stages[1:]]


# ------------------------------------------------------------------------------------------
# a list of synthetic kinds


@pytest.mark.parametrize("bad", [[], ["perception", "perception"], ["perception", "nope"], [3]])
def test_synthetic_kind_list_is_validated(bad):
    with pytest.raises(ValueError, match="synthetic"):
        DataConfig(synthetic=bad)


def test_synthetic_kind_list_from_an_override():
    cfg = load_config("default", ['stages.0.data.synthetic=["textual", "visual"]'])
    assert cfg.stages[0].data.synthetic == ["textual", "visual"]
    with pytest.raises(ValueError, match="synthetic"):
        load_config("default", ['stages.0.data.synthetic=["textual", "bogus"]'])


def test_mixed_stage_data_is_shuffled_and_deterministic():
    from staged.train import load_stage_data

    stage = StageConfig(data=DataConfig(synthetic=["perception", "textual", "visual"], num_samples=20))
    a, b = load_stage_data(stage, 0, seed=3), load_stage_data(stage, 0, seed=3)
    kinds = [s.extra["kind"] for s in a]
    assert Counter(kinds) == {"perception": 20, "textual": 20, "visual": 20}
    assert kinds != sorted(kinds, key=["perception", "textual", "visual"].index)  # mixed, not blocks
    assert [(s.prompt, s.answer) for s in a] == [(s.prompt, s.answer) for s in b]


# ------------------------------------------------------------------------------------------
# the command


def test_quick_overrides_shrink_every_stage_and_keep_a_grpo_step():
    for name in ("default", "merged", "caption_sft"):
        cfg = load_config(name, ablation.quick_overrides(load_config(name)))
        for s in cfg.stages:
            assert s.steps <= 6
            if s.type == "grpo":
                assert s.steps - s.sft_warmup_steps >= 1


def test_eval_sets_are_disjoint_from_training_seeds():
    sets = ablation.eval_sets(seed=0, n=8)
    assert list(sets) == list(ablation.EVAL_SETS)
    assert ablation.EVAL_SEED_OFFSET % 1000 != 0 and ablation.EVAL_SEED_OFFSET > 1000 * 10


def test_bad_override_is_a_config_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ablation.main(["--quick", "--out", str(tmp_path), "no_such_key=1"])
    assert e.value.code == 2
    assert "no_such_key" in capsys.readouterr().err


def test_quick_ablation_end_to_end(tmp_path, capsys):
    out = tmp_path / "ablation"
    res = ablation.main(["--quick", "--out", str(out), "--eval-n", "4", f"embedded_dir={tmp_path / 'embedded'}"])
    printed = capsys.readouterr().out
    assert [m["method"] for m in res["methods"]] == ["staged", "merged", "caption_sft"]
    for name in ("staged", "merged", "caption_sft"):
        assert f"| {name} |" in printed
        assert f"{name}: trained in" in printed  # one progress line per run
        assert (out / name / "eval" / "results.json").is_file()
    assert "| method | perception (%) | textual (%) | visual (%) | average (%)" in printed
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["table"] == res["table"] and saved["settings"]["eval_n"] == 4
    for m in saved["methods"]:
        assert set(m["benchmarks"]) == set(ablation.EVAL_SETS)
        assert all(b["n"] == 4 for b in m["benchmarks"].values())
        assert m["grpo_steps"] >= 1
    assert res["table"] in (out / "ablation.md").read_text()
    assert (out / "ablation.png").stat().st_size > 0


def test_stage_end_eval_is_logged(tmp_path):
    from staged import metrics
    from staged.train import train

    cfg = load_config("merged", [f"output_dir={tmp_path / 'run'}", f"embedded_dir={tmp_path / 'embedded'}",
                                 "stages.0.steps=2", "stages.0.sft_warmup_steps=1", "stages.0.data.num_samples=8",
                                 "progress=false", "plot=false", "tensorboard=false", "export_hf=false",
                                 'eval.synthetic=["perception", "textual"]', "eval.n=4", "eval.max_new_tokens=8"])
    train(cfg)
    records = metrics.read_jsonl(tmp_path / "run" / metrics.METRICS_FILE)
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 2
    for name in ("perception", "textual", "average"):
        assert 0.0 <= evals[0][f"eval/{name}/accuracy"] <= 1.0
        assert 1 <= evals[0][f"eval/{name}/response_tokens"] <= 8


def test_eval_config_is_validated():
    with pytest.raises(ValueError, match="eval.synthetic"):
        load_config("default", ['eval.synthetic=["bogus"]'])
    with pytest.raises(ValueError, match="eval.stages"):
        load_config("default", ["eval.stages=first"])
