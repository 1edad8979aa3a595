"""Stages that mix image and text-only samples on 2 ranks (gloo, CPU, torchrun): no hang, and the
same per-step metrics and exported weights as 1 process -- from the same warm checkpoint, tight
at the first step, then within the drift Adam allows (train_helpers.assert_runs_match).

A rank whose micro-batch (or rollout) has no image runs the vision tower on a dummy zero image so
that FSDP's all-gathers and reduce-scatters line up (staged.vision_dummy). Micro-batches of one
prompt make text-only micro-batches on one rank beside image ones on the other, and whole steps
without any image happen too (their vision gradients must stay None, as on 1 process, so that
AdamW skips the tower). Padded and packed micro-batches both."""
import json

import pytest

from train_helpers import assert_exports_match, assert_runs_match, read_records, run_header, run_train


# An sft stage and a GRPO stage with a KL reference (beta > 0: the reference's vision tower is
# gathered too), both on perception (images) + textual (text only) samples shuffled together,
# from the warm checkpoint, at lr 1e-5. G = 4 so that the GRPO stage earns rewards: with none,
# its gradient would be rounding noise that Adam turns into lr-sized steps of random sign,
# different on 1 and 2 ranks (the drift tolerance assumes real gradients).
MIXED_TOML = run_header(seed=1, checkpoint_every=0) + """
[[stages]]
name = "mixed-sft"
type = "sft"
data = {{ synthetic = ["perception", "textual"], num_samples = 32 }}
steps = 6
lr = 1e-5
batch = {{ prompts_per_step = 4, group_size = 1, micro_batch_size = 1 }}

[[stages]]
name = "mixed-grpo"
data = {{ synthetic = ["perception", "textual"], num_samples = 32, seed = 7 }}
steps = 4
lr = 1e-5
batch = {{ prompts_per_step = 4, group_size = 4, micro_batch_size = 2, rollout_batch_size = 2 }}
grpo = {{ max_response_tokens = 10, beta = 0.02 }}
"""

TIMEOUT_S = 300  # a hang (a rank skipping the vision tower's collectives) fails here instead



def _image_layout(cfg_path, nproc):
    """Per stage and step: how many images each rank's prompts hold (from the trainer's own data
    and prompt split), to check that the config exercises mixed ranks and image-free steps."""
    from staged.config import from_cli
    from staged.parallel import Dist
    from staged.train import load_stage_data, step_prompts

    cfg = from_cli(["--config", str(cfg_path)])
    out = []
    for si, stage in enumerate(cfg.stages):
        samples = load_stage_data(stage, si, cfg.seed)
        for step in range(stage.steps):
            out.append([sum(len(s.images) for _, s in
                            step_prompts(samples, stage, cfg.seed, si, step, Dist(r, nproc, r, None, None)))
                        for r in range(nproc)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_mixed_stage_two_ranks_match_one_process(tmp_path, warm_model, packing):
    runs = {}
    for nproc in (1, 2):
        root = tmp_path / f"n{nproc}"
        root.mkdir()
        out = root / "out"
        cfg = root / "mixed.toml"
        cfg.write_text(MIXED_TOML.format(model=warm_model, out=out))
        run_train(["--config", str(cfg), f"packing.enabled={str(packing).lower()}"], nproc=nproc, cwd=root,
                  timeout=TIMEOUT_S)
        runs[nproc] = out

    # The config must exercise what it is for: a step where one rank has images and the other
    # none, and a step without any image (vision gradients None, not zero).
    layout = _image_layout(cfg, 2)
    assert any(min(r) == 0 < max(r) for r in layout), json.dumps(layout)
    assert any(max(r) == 0 for r in layout), json.dumps(layout)

    one, two = read_records(runs[1]), read_records(runs[2])
    assert [r["step"] for r in one] == list(range(1, 11))
    assert not any(r["skipped"] for r in one + two)
    assert_runs_match(one, two)
    assert_exports_match(runs[1], runs[2], ("stage0-mixed-sft", "stage1-mixed-grpo"))
