"""The ablation baselines (merged, caption SFT) and `python -m staged.ablation`: the recipes load and
keep the staged default's budget, mixed synthetic data, and a --quick ablation end to end."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from staged import ablation
from staged.config import DataConfig, StageConfig, load_config
from staged.train import embedded_path


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


def _asdict_without(stage, *keys):
    d = dataclasses.asdict(stage)
    for k in keys:
        d.pop(k)
    return d


def test_merged_keeps_the_default_budget_and_warm_up():
    staged, merged = load_config("default"), load_config("merged")
    warm_p, warm_t, rl = merged.stages
    # the format warm-ups are the default's, as SFT stages: same data (kind, seed index), steps, rates
    for warm, src in ((warm_p, staged.stages[0]), (warm_t, staged.stages[1])):
        assert warm.type == "sft" and warm.steps == src.sft_warmup_steps
        assert warm.data == src.data and warm.freeze == src.freeze and warm.lr_at(0) == src.lr_at(0)
    assert warm_p.vision_lr_scale == staged.stages[0].vision_lr_scale
    assert rl.data.synthetic == [s.data.synthetic for s in staged.stages]
    assert rl.data.num_samples == staged.stages[0].data.num_samples
    assert grpo_steps(merged) == grpo_steps(staged) == 105
    assert sum(s.steps for s in merged.stages if s.type == "sft") == warmup_steps(staged) == 115
    assert abs(rollouts(merged) - rollouts(staged)) / rollouts(staged) < 0.01
    assert (merged.model, merged.seed, merged.embedded_dir) == (staged.model, staged.seed, staged.embedded_dir)


def test_caption_sft_replaces_only_the_perception_rl():
    staged, merged, cap = load_config("default"), load_config("merged"), load_config("caption_sft")
    warm, caption, *rest = cap.stages
    assert dataclasses.asdict(warm) == dataclasses.asdict(merged.stages[0])  # the same format warm-up
    p = staged.stages[0]
    assert (caption.type, caption.data.synthetic, caption.steps) == ("sft", "caption", p.steps - p.sft_warmup_steps)
    assert caption.batch.prompts_per_step == p.batch.prompts_per_step and caption.lr == p.lr
    assert [dataclasses.asdict(s) for s in rest] == [dataclasses.asdict(s) for s in staged.stages[1:]]
    assert sum(s.steps for s in cap.stages) == sum(s.steps for s in staged.stages)


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


def test_eval_seed_is_disjoint_from_training_seeds():
    assert ablation.EVAL_SEED_OFFSET % 1000 != 0 and ablation.EVAL_SEED_OFFSET > 1000 * 10
    assert load_config("default").eval.seed is None  # the trainer's default: run seed + 1,000,003, the same offset


def test_plan_arms_seeds_curriculum_and_eval(tmp_path):
    runs = ablation.plan(tmp_path, arms=["staged", "merged_e2h", "caption_sft@easy_to_hard"], seeds=[3, 4],
                         overrides=["stages.0.lr=1e-4"])
    assert [(r["arm"], r["seed"]) for r in runs] == [(a, s) for a in ("staged", "merged_e2h", "caption_sft_e2h")
                                                     for s in (3, 4)]
    for r in runs:
        cfg = r["cfg"]
        assert cfg.seed == r["seed"] and cfg.stages[0].lr == 1e-4
        assert Path(cfg.output_dir) == tmp_path / r["arm"] / f"seed{r['seed']}"
        assert embedded_path(cfg) == tmp_path / "embedded" / f"model-seed{r['seed']}"  # weights from the seed
        assert cfg.eval.synthetic == list(ablation.EVAL_SETS) and cfg.eval.n == 128 and cfg.eval.stages == "all"
        assert cfg.eval.max_new_tokens == 16
        e2h = r["arm"] != "staged"
        for s in cfg.stages:  # the curriculum changes RL stages only: every arm keeps the same warm-up
            rl = s.type == "grpo" and s.steps > s.sft_warmup_steps
            assert s.curriculum == ("easy_to_hard" if e2h and rl else "shuffle"), (r["arm"], s.name)


def test_plan_eval_files_and_torchrun(tmp_path):
    bench = tmp_path / "wemath.jsonl"
    bench.write_text("")
    runs = ablation.plan(tmp_path / "out", arms=["paper_qwen2_5_vl", "paper_merged_qwen2_5_vl"], seeds=[1],
                         eval_files=[str(bench)], nproc_per_node=8, overrides=["model=/ckpt/qwen"])
    assert [r["arm"] for r in runs] == ["paper_qwen2_5_vl", "paper_merged_qwen2_5_vl"]
    cfg = runs[0]["cfg"]
    assert cfg.model == "/ckpt/qwen" and cfg.eval.files == [str(bench.resolve())] and not cfg.eval.synthetic
    assert cfg.eval.n == 0 and cfg.eval.max_new_tokens == max(s.grpo.max_response_tokens for s in cfg.stages)
    assert not any(o.startswith("embedded_dir=") for o in runs[0]["overrides"])
    cmd = ablation.train_command(runs[0]["recipe"], runs[0]["overrides"], resume="auto", nproc_per_node=8)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8", "-m"]
    assert cmd[6:9] == ["staged.train", "--config", "paper_qwen2_5_vl"] and "resume=auto" in cmd
    assert ablation.train_command("default", [], resume="never")[1:3] == ["-m", "staged.train"]


def test_bad_arm_and_override_are_config_errors(tmp_path, capsys):
    for argv in (["no_such_key=1"], ["--arms", "staged,nope"], ["--recipes", "default@hardest"],
                 ["--arms", "staged,staged"]):
        with pytest.raises(SystemExit) as e:
            ablation.main(["--quick", "--out", str(tmp_path), *argv])
        assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert "no_such_key" in err and "nope" in err and "hardest" in err and "twice" in err


def test_statistics_are_paired_by_seed():
    def res(arm, seed, vis, tok):
        return {"arm": arm, "seed": seed, "train_seconds": 1.0, "eval_records": [],
                "benchmarks": {"visual": {"accuracy": vis, "format": 1.0, "response_tokens": tok, "truncated": 0.0},
                               "textual": {"accuracy": 0.5, "format": 1.0, "response_tokens": 5, "truncated": 0.0}}}
    rs = [res("merged", 0, 0.10, 10), res("merged", 1, 0.30, 10), res("staged", 0, 0.15, 8), res("staged", 1, 0.32, 9)]
    summ = ablation.summarize(rs, ["merged", "staged"], [0, 1], ["visual"], "merged")
    m, s = ablation.mean_std(summ["staged"]["diff"])
    assert summ["staged"]["diff"] == pytest.approx([5.0, 2.0]) and m == pytest.approx(3.5)
    assert s == pytest.approx(2.1213, abs=1e-3)  # the spread of the paired difference, not of each arm
    assert summ["staged"]["tokens_rel"] == pytest.approx([-20.0, -10.0])
    assert "diff" not in summ["merged"]
    md = ablation.markdown_tables(summ, ["visual"], "merged", rs)
    assert "| staged | 2 | 23.50 ± 12.02 | +3.50 ± 2.12 | 8.5 ± 0.7 | -15.0 ± 7.1% |" in md
    assert "staged − merged: +3.50 ± 2.12 (seed 0: +5.00, seed 1: +2.00; 2 of 2 seeds > 0, 0 < 0)" in md
    assert "Capability × difficulty" not in md  # only with its four arms


def test_in_stage_validation_records_join_the_curves(tmp_path):
    """Eval records logged inside a stage (eval.every) are curve points; the result is the last
    record of the last stage."""
    (run,) = ablation.plan(tmp_path, arms=["merged"], seeds=[0])
    run["dir"].mkdir(parents=True)

    def rec(step, stage, name, acc):
        r = {"step": step, "stage": stage, "stage_name": name, "stage_step": 1, "kind": "eval"}
        for b in ablation.EVAL_SETS + ("average",):
            r.update({f"eval/{b}/accuracy": acc, f"eval/{b}/format": 1.0, f"eval/{b}/response_tokens": 5.0,
                      f"eval/{b}/truncated": 0.0})
        return r
    lines = [rec(100, 0, "warmup_perception", 0.5), {"step": 150, "stage": 2, "kind": "grpo", "reward": 0.1},
             rec(150, 2, "merged", 0.2), rec(220, 2, "merged", 0.3)]
    (run["dir"] / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = ablation.collect(run, 1.0)
    assert [e["step"] for e in res["eval_records"]] == [100, 150, 220]
    assert res["final_step"] == 220 and res["benchmarks"]["visual"]["accuracy"] == 0.3
    table = ablation.curve_table([res], list(ablation.EVAL_SETS))
    assert "| merged | 150 | merged | 20.0 |" in table


def test_quick_ablation_seeds_arms_recipes_and_resume(tmp_path, capsys):
    """Two arms (one from --arms, one from --recipes with a curriculum) x two seeds, with an
    override for every arm; then one finished run is forgotten (as if the ablation had been killed
    before it) and a rerun trains only that one."""
    out = tmp_path / "ablation"
    argv = ["--quick", "--out", str(out), "--arms", "staged", "--recipes", "caption_sft@easy_to_hard",
            "--seeds", "0,1", "--eval-n", "2", "--jobs", "2", "stages.0.data.num_samples=16"]
    res = ablation.main(argv)
    printed = capsys.readouterr().out
    runs = [(r["arm"], r["seed"]) for r in res["runs"]]
    assert runs == [("staged", 0), ("staged", 1), ("caption_sft_e2h", 0), ("caption_sft_e2h", 1)]
    assert res["settings"]["baseline"] == "staged"  # no merged arm: the first one
    for arm, seed in runs:
        d = out / arm / f"seed{seed}"
        assert (d / ablation.RESULT_FILE).is_file()
        assert "16 samples" in (d / "train.log").read_text()  # the override reached the run
    for r in res["runs"]:
        assert set(r["benchmarks"]) == set(ablation.EVAL_SETS)
        stages = len(r["stages"])
        assert [e["stage"] for e in r["eval_records"]] == list(range(stages))  # one eval per stage end
        assert r["final_step"] == r["stages"][-1]["end_step"]
    assert res["runs"][2]["stages"][2]["curriculum"] == "easy_to_hard"
    assert "| staged | 2 |" in printed and "| caption_sft_e2h | 2 |" in printed
    assert "caption_sft_e2h − staged:" in printed and "Eval curves" in printed
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["table"] == res["table"] and saved["settings"]["seeds"] == [0, 1]
    assert res["table"] in (out / "ablation.md").read_text()
    assert (out / "ablation.png").stat().st_size > 0 and (out / "ablation-curves.png").stat().st_size > 0

    (out / "caption_sft_e2h" / "seed1" / ablation.RESULT_FILE).unlink()
    res2 = ablation.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 3
    assert "[1/1] caption_sft_e2h seed 1: training" in printed and "staged seed 0: training" not in printed
    assert [(r["arm"], r["seed"]) for r in res2["runs"]] == runs
    for a, b in zip(res["runs"], res2["runs"]):  # CPU runs are deterministic: the redone run agrees
        assert a["benchmarks"] == b["benchmarks"]

    res3 = ablation.main(argv + ["--seeds", "0,1,2", "--report-only"])  # seed 2 never ran: left out, not trained
    printed = capsys.readouterr().out
    assert printed.count("not finished") == 2 and "training" not in printed
    assert [(r["arm"], r["seed"]) for r in res3["runs"]] == runs

    with pytest.raises(SystemExit) as e:  # other settings in the same folder: refused, not mixed in
        ablation.main(argv[:-1] + ["stages.0.data.num_samples=8"])
    assert e.value.code == 2 and "other settings" in capsys.readouterr().err


def test_stage_end_eval_is_logged(tmp_path):
    from staged import metrics
    from staged.train import train

    cfg = load_config("merged", [f"output_dir={tmp_path / 'run'}", f"embedded_dir={tmp_path / 'embedded'}",
                                 "stages.0.steps=1", "stages.1.steps=1", "stages.2.steps=2", "eval.stages=last",
                                 "stages.0.data.num_samples=8", "stages.1.data.num_samples=8",
                                 "stages.2.data.num_samples=8",
                                 "progress=false", "plot=false", "tensorboard=false", "export_hf=false",
                                 'eval.synthetic=["perception", "textual"]', "eval.n=4", "eval.max_new_tokens=8"])
    train(cfg)
    records = metrics.read_jsonl(tmp_path / "run" / metrics.METRICS_FILE)
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 4
    for name in ("perception", "textual", "average"):
        assert 0.0 <= evals[0][f"eval/{name}/accuracy"] <= 1.0
        assert 1 <= evals[0][f"eval/{name}/response_tokens"] <= 8


def test_eval_config_is_validated():
    with pytest.raises(ValueError, match="eval.synthetic"):
        load_config("default", ['eval.synthetic=["bogus"]'])
    with pytest.raises(ValueError, match="eval.stages"):
        load_config("default", ["eval.stages=first"])
