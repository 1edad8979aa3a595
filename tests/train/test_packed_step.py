"""The packed GRPO step (packing.enabled, staged.packed_step) computes what the padded step
computes: on a real rollout of the embedded model, the same loss, metrics and gradients within
1e-5 (fp32, CPU) -- with a KL reference model, dapo's global normaliser, rollout log-probs as
old log-probs with the importance-sampling correction, and a filler micro-batch (what a rank with
fewer micro-batches than the others runs: forward and backward at weight 0). And 2 ranks packing
their own rollouts match 1 process with padded micro-batches over a whole multi-stage run (from
the same warm checkpoint: tight at the first step, then within the drift Adam allows).

Vision features (staged.vision_reuse): the rollout's reused by the policy, the reference's own
computed once per distinct image and step, and the policy's once per distinct image of a
micro-batch when the rollout's are stale give the per-row tower's step (reference log-probs,
losses, every update's gradients), with tower calls counted.

Rewards are replaced by fixed random ones in the single-step tests: the untrained embedded model
earns almost none, and zero advantages would leave only the KL term to compare."""
from __future__ import annotations


import pytest
import torch
from train_helpers import (STAGE_DIRS, assert_exports_match, assert_runs_match, read_records, run_train,
                           write_tiny_config)

from staged import packed_step, parallel, train
from staged.config import from_cli


class CaptureOptimizer:
    """Stands in for AdamW: step() records the accumulated gradients (full tensors)."""

    def __init__(self, model):
        self.model, self.param_groups, self.grads = model, [], None

    def step(self):
        self.grads = {}
        for n, p in self.model.named_parameters():
            if p.grad is not None:
                g = p.grad
                self.grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()

    def zero_grad(self, set_to_none=True):
        for p in self.model.parameters():
            p.grad = None


def fake_rewards(texts, samples, **kw):
    g = torch.Generator().manual_seed(1234 + len(texts))
    r = torch.rand(len(texts), generator=g)
    return {"reward": r, "accuracy": (r > 0.5).float(), "format": torch.zeros(len(texts))}


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory, embedded_dir):
    root = tmp_path_factory.mktemp("packed_step")
    path = write_tiny_config(root / "tiny.toml", root / "out", embedded_dir)
    d = parallel.init_distributed("cpu")
    yield path, d


def one_step(run_cfg, embedded_dir, monkeypatch, *, packing: bool, overrides: list[str], stage_index: int = 0,
             extra_micro_batches: int = 0, optimizer=CaptureOptimizer, prepare=None):
    """One GRPO step (global step 0); returns (record, the optimizer's captured gradients).
    ``prepare(model, ref)`` runs before it."""
    path, d = run_cfg
    cfg = from_cli(["--config", str(path), f"packing.enabled={str(packing).lower()}", *overrides])
    stage = cfg.stages[stage_index]
    monkeypatch.setattr(train, "compute_rewards", fake_rewards)
    if extra_micro_batches:
        orig = packed_step.collate_items

        def collate_more(samples, micro_batches, n, *a, **k):
            return orig(samples, micro_batches, n + extra_micro_batches, *a, **k)

        monkeypatch.setattr(packed_step, "collate_items", collate_more)
    torch.manual_seed(0)
    model, processor = train.build_model(embedded_dir, cfg, d, stage.freeze)
    ref = train.build_model(embedded_dir, cfg, d, [], trainable=False)[0] if stage.grpo.beta > 0 else None
    if prepare is not None:
        prepare(model, ref)
    opt = optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sp = train.sampling_params(stage, cfg, model, processor.tokenizer)
    samples = train.load_stage_data(stage, stage_index, cfg.seed)
    prompts = train.step_prompts(samples, stage, cfg.seed, stage_index, 0, d)
    _, dtype = parallel.mixed_precision(cfg.precision, d.device)
    rec = train.grpo_step(model, ref, opt, params, processor, stage, cfg, d, prompts, 0, sp, dtype)
    return rec, getattr(opt, "updates", opt.grads)


CASES = {
    # the tiny config's stage 0: beta 0.02 (reference model), grpo; micro-batches of 3 rows padded
    "grpo-kl": (["stages.0.batch.micro_batch_size=3"], 0, 0),
    # a filler micro-batch (weight 0) must change nothing
    "grpo-kl-filler": (["stages.0.batch.micro_batch_size=3"], 0, 1),
    # stage 1: dapo (global token normaliser), frozen vision tower, one padded micro-batch;
    # packed under a small fixed budget (several micro-batches)
    "dapo-frozen-budget": (["packing.token_budget=300"], 1, 0),
    # rollout log-probs as old log-probs and TRL's importance-sampling correction
    "rollout-old-logp": (["stages.0.grpo.old_logp=rollout", "stages.0.grpo.rollout_is_correction=true",
                          "stages.0.batch.micro_batch_size=5"], 0, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_step_matches_padded(case, run_cfg, embedded_dir, monkeypatch):
    overrides, si, extra = CASES[case]
    pad, g_pad = one_step(run_cfg, embedded_dir, monkeypatch, packing=False, overrides=overrides, stage_index=si)
    pack, g_pack = one_step(run_cfg, embedded_dir, monkeypatch, packing=True, overrides=overrides, stage_index=si,
                            extra_micro_batches=extra)
    # (on-policy with a reference equal to the policy, the loss is 0 up to rounding: sum of A = 0;
    # its gradient is not, checked below)
    assert pad["response_length"] > 1
    for k in ("loss", "grad_norm", "reward", "response_length", "entropy", "kl", "clip_ratio", "ratio_mean",
              "sampler_logp_diff"):
        assert pack[k] == pytest.approx(pad[k], abs=1e-5, rel=1e-5), (k, pad[k], pack[k])
    assert g_pad and g_pad.keys() == g_pack.keys()
    assert any(g.abs().max() > 1e-3 for g in g_pad.values()), "the step should have real gradients"
    for n in g_pad:
        torch.testing.assert_close(g_pack[n], g_pad[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("case", ["grpo-kl", "dapo-frozen-budget"])
def test_packed_step_matches_padded_qwen3_vl(case, run_cfg, qwen3_dir, monkeypatch):
    """The same on a tiny Qwen3-VL: the packed forward's deepstack and interleaved mrope against
    transformers' padded forward, through the whole step (loss, metrics, every gradient)."""
    test_packed_step_matches_padded(case, run_cfg, qwen3_dir, monkeypatch)


def test_plan_rank_keeps_groups_and_budget():
    lengths = [30, 10, 25, 5, 40, 12, 8, 20]  # 4 groups of 2
    mbs = packed_step.plan_rank(lengths, 2, 50, 4)
    assert sorted(i for mb in mbs for i in mb) == list(range(8))
    assert all(sum(lengths[i] for i in mb) <= 50 for mb in mbs)
    with pytest.raises(ValueError, match="packing.token_budget: a sequence of 40 tokens"):
        packed_step.plan_rank(lengths, 2, 39, 4)
    assert packed_step.plan_rank(lengths, 2, 0, 2) == packed_step.plan_rank(lengths, 2, 80, 2)


# ------------------------------------------------------------------------------------------
# 2 ranks, packed, against 1 process, padded (the shared reference run)




@pytest.mark.slow
def test_two_ranks_packed_match_one_process_padded(tmp_path, warm_model, reference_run):
    out = tmp_path / "out"
    cfg = write_tiny_config(tmp_path / "tiny.toml", out, warm_model)
    run_train(["--config", str(cfg), "packing.enabled=true", "packing.token_budget=200",
               "fsdp.activation_checkpointing=true"], nproc=2, cwd=tmp_path)
    assert_runs_match(read_records(reference_run), read_records(out))
    assert_exports_match(reference_run, out, STAGE_DIRS[:2])


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reuse", [True, False])
def test_vision_tower_runs_once_per_distinct_image(reuse, packing, run_cfg, embedded_dir, monkeypatch):
    """Rollout prefill: the tower once per distinct prompt (not per sample). Training: with reuse,
    one deferred pass over the distinct images (the padded or packed micro-batches take the
    rollout's features); without, every sample's forward runs it again (G times)."""
    from staged.models.loading import vision_module

    seen = []
    orig = train.build_model

    def counting_build(*a, **k):
        model, proc = orig(*a, **k)
        if k.get("trainable", True):
            vision_module(model).register_forward_hook(lambda m, args, kw, out: seen.append(int(kw["grid_thw"].shape[0])),
                                                       with_kwargs=True)
        return model, proc

    monkeypatch.setattr(train, "build_model", counting_build)
    rec, grads = one_step(run_cfg, embedded_dir, monkeypatch, packing=packing,
                          overrides=["stages.0.batch.micro_batch_size=3", f"rollout.reuse_vision_features={str(reuse).lower()}"])
    prompts, G = 4, 4  # the tiny config's stage 0: one image per prompt
    assert sum(seen) == (2 * prompts if reuse else prompts + G * prompts), seen
    assert any(".visual." in f".{n}" and g.abs().max() > 0 for n, g in grads.items()), "the tower must get a gradient"


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reuse", [True, False])
def test_vision_tower_runs_once_per_distinct_image_qwen3_vl(reuse, packing, run_cfg, qwen3_dir, monkeypatch):
    """The same on a tiny Qwen3-VL: its deepstack features are reused with the merged ones."""
    test_vision_tower_runs_once_per_distinct_image(reuse, packing, run_cfg, qwen3_dir, monkeypatch)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("model", ["embedded", "qwen3_vl"])
def test_reused_vision_features_give_the_same_step(model, packing, run_cfg, embedded_dir, qwen3_dir, monkeypatch):
    """Reusing the rollout's vision features (merged, and Qwen3-VL's deepstack) changes neither
    the step's numbers nor any gradient -- the tower's and the deepstack mergers' included --
    against running the tower in every micro-batch."""
    ckpt = embedded_dir if model == "embedded" else qwen3_dir
    steps = {}
    for reuse in (True, False):
        steps[reuse] = one_step(run_cfg, ckpt, monkeypatch, packing=packing,
                                overrides=["stages.0.batch.micro_batch_size=3",
                                           f"rollout.reuse_vision_features={str(reuse).lower()}"])
    (rec, grads), (rec0, grads0) = steps[True], steps[False]
    for k in ("loss", "grad_norm", "entropy", "kl", "sampler_logp_diff"):
        assert rec[k] == pytest.approx(rec0[k], abs=1e-5, rel=1e-5), (k, rec[k], rec0[k])
    assert grads.keys() == grads0.keys()
    for n in grads0:
        torch.testing.assert_close(grads[n], grads0[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    if model == "qwen3_vl":
        assert any("deepstack_merger_list" in n and g.abs().max() > 0 for n, g in grads0.items())


# ------------------------------------------------------------------------------------------
# vision features computed in training: the reference's once per distinct image and step, and
# the policy's once per distinct image of a micro-batch when the rollout's are stale


BUILD_MODEL, POLICY_LOSS = train.build_model, train.policy_loss  # the real ones, under the spies below


class SGDCapture(CaptureOptimizer):
    """Records every update's gradients and moves the weights by plain SGD, so that the updates
    after the first see new weights (stale rollout features would show) and two runs stay within
    rounding of each other (Adam turns last-bit differences of ~0 gradients into lr-sized steps)."""

    def __init__(self, model, lr: float = 0.05):
        super().__init__(model)
        self.lr, self.updates = lr, []

    def step(self):
        super().step()
        self.updates.append(self.grads)
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.lr)


def perturb_policy_tower(model, ref):
    """The policy's tower away from the reference's: features taken from the wrong model show."""
    from staged.models.loading import vision_module

    with torch.no_grad():
        for p in vision_module(model).parameters():
            p.mul_(1.25)


def record_ref_logp(monkeypatch) -> list:
    """The reference log-probs each policy_loss call sees, in order."""
    seen, real = [], POLICY_LOSS

    def spy(logp, old_logp, ref_logp, *a, **kw):
        seen.append(None if ref_logp is None else ref_logp.detach().clone())
        return real(logp, old_logp, ref_logp, *a, **kw)

    monkeypatch.setattr(train, "policy_loss", spy)
    return seen


def count_tower_images(monkeypatch) -> dict:
    """Each vision-tower call's images (as bytes of their pixels), by model: policy or reference."""
    from staged.models.loading import vision_module

    calls = {"policy": [], "reference": []}
    orig = BUILD_MODEL

    def hook(who):
        def record(m, args, kw, out):
            pixels, grid = (kw.get("hidden_states", args[0] if args else None), kw["grid_thw"])
            per = pixels.split(grid.prod(-1).tolist())
            calls[who].append([x.detach().float().numpy().tobytes() for x in per])
        return record

    def counting_build(*a, **k):
        model, proc = orig(*a, **k)
        who = "policy" if k.get("trainable", True) else "reference"
        vision_module(model).register_forward_hook(hook(who), with_kwargs=True)
        return model, proc

    monkeypatch.setattr(train, "build_model", counting_build)
    return calls


# 4 prompts x G = 4 rows (one image each), micro-batches of 3 rows (cut inside groups):
# "one-update": the rollout's features serve the policy; "two-mini-batches" (2 updates, the tower
# trains): they are stale after the first, so each training forward runs the tower itself.
VISION_CASES = {"one-update": ["stages.0.batch.micro_batch_size=3"],
                "two-mini-batches": ["stages.0.batch.micro_batch_size=3", "stages.0.batch.mini_batch_prompts=2"]}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("model", ["embedded", "qwen3_vl"])
def test_reference_tower_runs_once_per_distinct_image_and_step(model, packing, run_cfg, embedded_dir, qwen3_dir,
                                                               monkeypatch):
    """The reference's tower sees each of the step's images once (before: once per row, G times);
    each policy forward that runs the tower (rollout features stale) sees no image twice."""
    ckpt = embedded_dir if model == "embedded" else qwen3_dir
    prompts, G = 4, 4
    runs = {}
    for reuse in (True, False):
        calls = count_tower_images(monkeypatch)
        one_step(run_cfg, ckpt, monkeypatch, packing=packing, optimizer=SGDCapture,
                 overrides=[*VISION_CASES["two-mini-batches"], f"rollout.reuse_vision_features={str(reuse).lower()}"])
        runs[reuse] = calls
    ref = [img for call in runs[True]["reference"] for img in call]
    assert len(ref) == prompts and len(set(ref)) == prompts, [len(c) for c in runs[True]["reference"]]
    assert sum(len(c) for c in runs[False]["reference"]) == G * prompts  # today's path, per row
    # the policy: the rollout's prefill once per prompt (one tower call per prefill forward), then
    # each training forward once per distinct image
    def rollout_and_training(calls):
        k = next(i for i in range(1, len(calls) + 1) if sum(map(len, calls[:i])) >= prompts)
        return [img for c in calls[:k] for img in c], calls[k:]

    rollout, train_calls = rollout_and_training(runs[True]["policy"])
    assert len(rollout) == prompts and len(set(rollout)) == prompts and train_calls
    assert all(len(set(c)) == len(c) for c in train_calls), [len(c) for c in train_calls]
    per_row = rollout_and_training(runs[False]["policy"])[1]
    assert sum(map(len, train_calls)) < sum(map(len, per_row))
    assert any(len(set(c)) < len(c) for c in per_row)  # the check above has teeth


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("model", ["embedded", "qwen3_vl"])
@pytest.mark.parametrize("case", list(VISION_CASES))
def test_features_computed_once_give_the_per_row_step(case, model, packing, run_cfg, embedded_dir, qwen3_dir,
                                                      monkeypatch):
    """The reference's features once per distinct image, and (two mini-batches) the policy's once
    per distinct image of a micro-batch, against the tower run for every row: the same reference
    log-probs, losses and every update's gradients (the tower's and Qwen3-VL's deepstack mergers'
    included). The policy's tower is moved away from the reference's, and the prompts' images
    differ, so features taken from the wrong model or mapped to the wrong prompt show."""
    ckpt = embedded_dir if model == "embedded" else qwen3_dir
    runs = {}
    for reuse in (True, False):
        ref_logp = record_ref_logp(monkeypatch)
        rec, updates = one_step(run_cfg, ckpt, monkeypatch, packing=packing, optimizer=SGDCapture,
                                prepare=perturb_policy_tower,
                                overrides=[*VISION_CASES[case], f"rollout.reuse_vision_features={str(reuse).lower()}"])
        runs[reuse] = rec, updates, ref_logp
    (rec, updates, ref_logp), (rec0, updates0, ref_logp0) = runs[True], runs[False]
    assert rec["updates"] == len(updates) == (1 if case == "one-update" else 2)
    assert len(ref_logp) == len(ref_logp0) and all(x is not None for x in ref_logp0)
    for i, (a, b) in enumerate(zip(ref_logp, ref_logp0)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, i=i: f"reference log-probs {i}: {m}")
    for k in ("loss", "kl", "entropy", "sampler_logp_diff"):
        assert rec[k] == pytest.approx(rec0[k], abs=1e-6, rel=1e-5), (k, rec[k], rec0[k])
    for k in ("loss_updates", "grad_norm_updates"):
        assert rec[k] == pytest.approx(rec0[k], abs=1e-6, rel=1e-5), (k, rec[k], rec0[k])
    assert rec0["kl"] > 1e-6, "the reference should differ from the policy"
    for u, (g, g0) in enumerate(zip(updates, updates0)):
        assert g.keys() == g0.keys()
        assert any(".visual." in f".{n}" and x.abs().max() > 0 for n, x in g0.items()), "the tower must learn"
        for n in g0:
            torch.testing.assert_close(g[n], g0[n], atol=1e-6, rtol=1e-5,
                                       msg=lambda m, n=n, u=u: f"update {u} {n}: {m}")
