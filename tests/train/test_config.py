"""Config: validation names the field, overrides in both spellings, unknown keys are errors."""
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
])
def test_invalid_run_field_is_named(top, field):
    with pytest.raises(ValueError, match=f"^{field}"):
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
    for s in paper.stages:
        assert (s.batch.prompts_per_step, s.batch.group_size) == (512, 5)
        assert s.lr == 1e-6 and s.schedule == "constant"
        assert (s.grpo.eps_low, s.grpo.eps_high, s.grpo.beta) == (0.2, 0.3, 1e-2)
        assert (s.grpo.temperature, s.grpo.max_response_tokens) == (1.0, 2048)
        assert s.curriculum == "easy_to_hard"
    assert [s.freeze for s in paper.stages] == [[], ["vision"], []]


def test_lr_schedule():
    s = StageConfig(steps=10, sft_warmup_steps=3, sft_lr=1.0, lr=0.1, warmup_steps=4, schedule="cosine")
    lrs = [s.lr_at(i) for i in range(10)]
    assert lrs[:3] == [1.0, 1.0, 1.0]                          # format warm-up at sft_lr
    assert lrs[3:7] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # linear ramp over the GRPO steps
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)            # cosine to min_lr_ratio * lr
    assert StageConfig(lr=0.5).lr_at(7) == 0.5


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
