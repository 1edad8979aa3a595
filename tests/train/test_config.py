"""Config: validation names the field, overrides in both spellings, unknown keys are errors."""
import dataclasses

import pytest

from staged.config import (StageConfig, TrainConfig, apply_override, from_cli, from_dict, load_config,
                           parse_overrides)


def _d(**stage):
    return {"stages": [dict({"name": "s"}, **stage)]}


@pytest.mark.parametrize("stage, field", [
    ({"lr": 0.0}, "stages[0].lr"),
    ({"steps": 0}, "stages[0].steps"),
    ({"type": "ppo"}, "stages[0].type"),
    ({"freeze": ["eyes"]}, "stages[0].freeze"),
    ({"schedule": "linear"}, "stages[0].schedule"),
    ({"schedule": "warmup"}, "stages[0].warmup_steps"),
    ({"curriculum": "random"}, "stages[0].curriculum"),
    ({"sft_warmup_steps": 11, "steps": 10}, "stages[0].sft_warmup_steps"),
    ({"batch": {"group_size": 1}}, "stages[0].batch.group_size"),
    ({"batch": {"micro_batch_size": 0}}, "stages[0].batch.micro_batch_size"),
    ({"grpo": {"loss_type": "ppo"}}, "stages[0].grpo.loss_type"),
    ({"grpo": {"top_p": 0.0}}, "stages[0].grpo.top_p"),
    ({"grpo": {"temperature": -1.0}}, "stages[0].grpo.temperature"),
    ({"grpo": {"delta": 0.5}}, "stages[0].grpo.delta"),
    ({"reward": {"kind": "vibes"}}, "stages[0].reward.kind"),
    ({"data": {"synthetic": "audio"}}, "stages[0].data.synthetic"),
    ({"data": {"synthetic": "textual", "files": ["a.jsonl"]}}, "stages[0].data.synthetic"),
    ({"lr": "fast"}, "stages[0].lr"),
    ({"batch": {"prompts_per_step": 8, "mini_batch_prompts": 3}}, "stages[0].batch.mini_batch_prompts"),
    ({"batch": {"mini_batch_prompts": -2}}, "stages[0].batch.mini_batch_prompts"),
    ({"grpo": {"ppo_epochs": 0}}, "stages[0].grpo.ppo_epochs"),
    ({"grpo": {"dual_clip": 1.0}}, "stages[0].grpo.dual_clip"),
    ({"grpo": {"dual_clip": 0.5}}, "stages[0].grpo.dual_clip"),
])
def test_invalid_stage_field_is_named(stage, field):
    with pytest.raises(ValueError) as e:
        from_dict(_d(**stage))
    assert str(e.value).startswith(field), str(e.value)


@pytest.mark.parametrize("top, field", [
    ({"precision": "fp8"}, "precision"),
    ({"resume": "sometimes"}, "resume"),
    ({"max_consecutive_bad_steps": 0}, "max_consecutive_bad_steps"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"eval": {"every": 2}}, "eval.every"),  # no eval sets
    ({"eval": {"synthetic": ["perception"], "every": -1}}, "eval.every"),
    ({"eval": {"synthetic": ["perception"], "temperature": -0.5}}, "eval.temperature"),
    ({"eval": {"synthetic": ["perception"], "temperature": 0.6, "top_p": 0.0}}, "eval.top_p"),
    ({"eval": {"synthetic": ["perception"], "samples": 4}}, "eval.samples"),  # greedy gives one
    ({"eval": {"synthetic": ["perception"], "temperature": 0.6, "samples": 0}}, "eval.samples"),
    ({"rollout": {"attention": "xformers"}}, "rollout.attention"),
    ({"device": "cpu", "rollout": {"attention": "triton"}}, "rollout.attention"),
    ({"rollout": {"engine": "vllm"}}, "rollout.engine"),  # once: not "rollout.rollout.engine"
    ({"rollout": {"kv_cache_memory_fraction": 2.0}}, "rollout.kv_cache_memory_fraction"),
    ({"packing": {"token_budget": -1}}, "packing.token_budget"),
])
def test_invalid_run_field_is_named(top, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        from_dict(dict(_d(), **top))


def test_needs_stages_and_unique_names():
    with pytest.raises(ValueError, match="stages"):
        TrainConfig(stages=[])
    with pytest.raises(ValueError, match="unique"):
        from_dict({"stages": [{"name": "a"}, {"name": "a"}]})


def test_unknown_keys_are_errors_naming_the_key():
    with pytest.raises(ValueError, match=r"unknown config key 'stages\[0\].grpo.bta'"):
        from_dict(_d(grpo={"bta": 0.1}))
    with pytest.raises(ValueError, match="unknown config key 'modle'"):
        from_dict(dict(_d(), modle="x"))
    d = _d()
    with pytest.raises(ValueError, match="unknown config key 'stages.0.grpo.bta'"):
        apply_override(d, "stages.0.grpo.bta", 0.1)
    with pytest.raises(ValueError, match="out of range"):
        apply_override(d, "stages.3.lr", 0.1)
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        from_cli(["nope=1"])


def test_overrides_both_spellings_and_toml_values():
    cfg = from_cli(["--stages.0.lr", "2e-3", "stages.1.grpo.beta=0.05", "--stages.2.freeze=[\"vision\"]",
                    "seed=7", "--output-dir", "somewhere", "stages.0.grpo.loss_type=dapo"])
    assert cfg.stages[0].lr == 2e-3
    assert cfg.stages[1].grpo.beta == 0.05
    assert cfg.stages[2].freeze == ["vision"]
    assert cfg.seed == 7 and cfg.output_dir == "somewhere"
    assert cfg.stages[0].grpo.loss_type == "dapo"
    assert parse_overrides(["a.b=1", "--c", "true"]) == [("a.b", 1), ("c", True)]


def test_override_values_are_validated():
    with pytest.raises(ValueError, match=r"^stages\[0\]\.batch\.group_size"):
        from_cli(["stages.0.batch.group_size=1"])


def test_shipped_recipes_load():
    default = load_config()
    assert [s.name for s in default.stages] == ["perception", "textual", "visual"]
    assert default.model == "embedded"
    assert default.stages[1].freeze == ["vision"]
    paper = load_config("paper_qwen2_5_vl")
    qwen3 = load_config("paper_qwen3_vl")
    assert qwen3.model == "Qwen/Qwen3-VL-8B-Instruct"
    # the same recipe as the Qwen2.5-VL one but for the model (and where it writes)
    assert dataclasses.replace(qwen3, model=paper.model, output_dir=paper.output_dir) == paper
    for s in paper.stages:
        assert (s.batch.prompts_per_step, s.batch.group_size) == (512, 5)
        assert s.lr == 1e-6 and s.schedule == "constant"
        assert (s.grpo.eps_low, s.grpo.eps_high, s.grpo.beta) == (0.2, 0.3, 1e-2)
        assert (s.grpo.temperature, s.grpo.max_response_tokens) == (1.0, 2048)
        assert s.curriculum == "shuffle"  # the release's staged runs shuffle (tests/test_paper_recipes.py: all values)
    assert [s.freeze for s in paper.stages] == [[], ["vision"], []]


def test_lr_schedule():
    s = StageConfig(steps=10, sft_warmup_steps=3, sft_lr=1.0, lr=0.1, warmup_steps=4, schedule="cosine")
    lrs = [s.lr_at(i) for i in range(10)]
    assert lrs[:3] == [1.0, 1.0, 1.0]                          # format warm-up at sft_lr
    assert lrs[3:7] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # linear ramp over the GRPO steps
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)            # cosine to min_lr_ratio * lr
    assert StageConfig(lr=0.5).lr_at(7) == 0.5


def test_bad_minibatch_and_dual_clip_values_are_one_clear_error(capsys):
    """On the command line: exit status 2 and one line naming the field and the value."""
    from staged.train import main

    for arg, msg in (("stages.0.grpo.dual_clip=1.0", "stages[0].grpo.dual_clip: must be > 1 when set (None = off), "
                                                     "got 1.0"),
                     ("stages.0.batch.mini_batch_prompts=3", "stages[0].batch.mini_batch_prompts: must divide "
                                                             "prompts_per_step=8"),
                     ("eval.every=5", "eval.every: every=5 needs eval sets")):
        with pytest.raises(SystemExit) as e:
            main([arg])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and msg in err, err


def test_mini_batches_must_split_over_the_ranks():
    from staged import train
    from staged.parallel import Dist

    cfg = from_cli(["stages.0.batch.prompts_per_step=4", "stages.0.batch.mini_batch_prompts=1"])
    d = Dist(rank=0, world_size=2, local_rank=0, device=None, mesh=None)
    with pytest.raises(ValueError, match=r"stages\[0\].batch.mini_batch_prompts: 1 prompts do not split evenly over 2"):
        train.check_geometry(cfg, d)
    train.check_geometry(from_cli(["stages.0.batch.prompts_per_step=4", "stages.0.batch.mini_batch_prompts=2"]), d)
    assert cfg.stages[0].batch.num_mini_batches == 4 and from_cli([]).stages[0].batch.num_mini_batches == 1


def test_delta_with_cispo_is_ignored_with_a_warning():
    """TRL, the fused loss and its TRL adapter ignore delta for cispo: the trainer config accepts
    it too, with one warning naming the field, and the loss is the one without delta."""
    import warnings

    import torch

    from staged.grpo import policy_loss

    with pytest.warns(UserWarning, match=r"grpo\.delta=2\.0 is ignored with loss_type='cispo'") as rec:
        cfg = from_dict(_d(grpo={"loss_type": "cispo", "delta": 2.0})).stages[0].grpo
    assert len([w for w in rec if "delta" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the clipped losses read delta: no warning there
        from_dict(_d(grpo={"loss_type": "dapo", "delta": 2.0}))
        plain = from_dict(_d(grpo={"loss_type": "cispo"})).stages[0].grpo
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 6, generator=g)
    old = logp + 0.5 * torch.randn(3, 6, generator=g)
    args = (logp, old, None, torch.randn(3, generator=g), torch.ones(3, 6, dtype=torch.bool))
    a = policy_loss(*args, cfg=cfg, num_items_in_batch=18, world_size=1)[0]
    b = policy_loss(*args, cfg=plain, num_items_in_batch=18, world_size=1)[0]
    assert a.item() == b.item()


def test_dual_clip_with_a_loss_type_that_has_no_clip_is_a_config_error():
    from staged.kernels.grpo_options import CLIPPED_LOSS_TYPES

    from staged.config import LOSS_TYPES

    for lt in LOSS_TYPES:
        if lt in CLIPPED_LOSS_TYPES:
            from_dict(_d(grpo={"loss_type": lt, "dual_clip": 3.0}))
        else:
            with pytest.raises(ValueError, match=rf"dual_clip: applies to the clipped loss types .* not '{lt}'"):
                from_dict(_d(grpo={"loss_type": lt, "dual_clip": 3.0}))


def test_a_kv_cache_too_small_for_the_longest_prompt_is_refused_before_the_model_loads():
    """rollout.kv_cache_tokens below what the engine reserves for one row of a prompt of up to a
    stage's data.max_prompt_tokens + grpo.max_response_tokens (whole blocks, as the engine counts:
    200 + 64 tokens take 18 blocks of 16): the engine could never admit such a row; said at
    config time, naming the stage and the numbers."""
    stage = {"name": "files", "data": {"files": ["x.jsonl"], "max_prompt_tokens": 200},
             "grpo": {"max_response_tokens": 64}}
    for tokens in (263, 264, 287):  # 264 = 200 + 64 tokens, but 16 blocks: the engine needs 18
        with pytest.raises(ValueError, match=rf"^rollout\.kv_cache_tokens: {tokens} tokens cannot hold one row of "
                                             r"stage 'files': a prompt of up to data\.max_prompt_tokens=200 \+ "
                                             r"grpo\.max_response_tokens=64 needs at least 288 \(18 blocks of 16"):
            from_dict({"rollout": {"kv_cache_tokens": tokens}, "stages": [stage]})
    from_dict({"rollout": {"kv_cache_tokens": 288}, "stages": [stage]})  # enough for the row itself
    from_dict({"rollout": {"kv_cache_tokens": 0}, "stages": [stage]})    # sized by the engine
    from_dict({"rollout": {"kv_cache_tokens": 263, "engine": "simple"}, "stages": [stage]})  # no paged cache
    # no rollout at all: an sft stage, a grpo stage of format warm-up steps only
    from_dict({"rollout": {"kv_cache_tokens": 263}, "stages": [dict(stage, type="sft")]})
    from_dict({"rollout": {"kv_cache_tokens": 263}, "stages": [dict(stage, steps=4, sft_warmup_steps=4)]})
    with pytest.raises(ValueError, match="cannot hold one row"):
        from_dict({"rollout": {"kv_cache_tokens": 263}, "stages": [dict(stage, steps=4, sft_warmup_steps=3)]})


@pytest.mark.parametrize("block_size", [0, 1, 4, 16, 64])
@pytest.mark.parametrize("limit,new", [(1, 1), (15, 1), (16, 16), (17, 5), (200, 64), (208, 64), (250, 7)])
def test_the_config_time_kv_check_agrees_with_the_engine(block_size, limit, new):
    """The smallest kv_cache_tokens the config takes is one with which the engine admits a row of
    every prompt length up to data.max_prompt_tokens, and one block less is refused by both."""
    import torch

    from staged.config import _row_blocks
    from staged.rollout.cache import KVCacheTooSmall, PagedKVCache
    from staged.rollout.engine import Scheduler

    bs = block_size or 16
    stage = {"name": "s", "data": {"files": ["x.jsonl"], "max_prompt_tokens": limit},
             "grpo": {"max_response_tokens": new}}
    least = _row_blocks(limit, new, bs) * bs
    from_dict({"rollout": {"kv_cache_tokens": least, "block_size": block_size}, "stages": [stage]})
    with pytest.raises(ValueError, match="cannot hold one row"):
        from_dict({"rollout": {"kv_cache_tokens": least - 1, "block_size": block_size}, "stages": [stage]})

    def engine_takes(tokens: int, prompt: int) -> bool:
        sched = Scheduler([0], [prompt], bs, 1, new)
        try:
            sched.bind(PagedKVCache(1, max(1, tokens // bs), bs, 1, 1, torch.float32, "cpu"))
        except KVCacheTooSmall:
            return False
        return True

    assert all(engine_takes(least, p) for p in range(1, limit + 1))
    assert not all(engine_takes(least - 1, p) for p in range(1, limit + 1))


def test_errors_the_user_must_fix_are_one_message_others_keep_their_traceback(monkeypatch, capsys):
    """What a run raises with ``one_message`` (a KV cache too small, a refused resume, a bad
    checkpoint) ends the CLI with one line and exit status 2; anything else propagates as it is."""
    from staged import train
    from staged.rollout.cache import KVCacheTooSmall

    def too_small(cfg):
        raise KVCacheTooSmall("rollout KV cache too small for one row: the numbers")

    monkeypatch.setattr(train, "train", too_small)
    with pytest.raises(SystemExit) as e:
        train.main([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "staged.train: rollout KV cache too small for one row: the numbers\n", err

    def bug(cfg):
        raise ValueError("a bug")

    monkeypatch.setattr(train, "train", bug)
    with pytest.raises(ValueError, match="a bug"):
        train.main([])


def test_a_config_error_is_said_once_on_several_ranks(monkeypatch, capsys):
    """Every rank of a torchrun job parses the same config and refuses it alike: rank 0 says it
    (the kv_cache_tokens refusal moved the KV-cache error here from the run, where it is one
    message on any rank count): the first rank of each node says it; every rank exits 2."""
    from staged import train

    bad = ["rollout.kv_cache_tokens=-1"]
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(SystemExit) as e:
            train.main(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and ("config error: rollout.kv_cache_tokens" in err) == said, (rank, err)
