"""Mini-batch updates of a GRPO step (batch.mini_batch_prompts, grpo.ppo_epochs; staged.minibatch).

In-process steps of the embedded model on a real rollout, rewards replaced by fixed random ones
(the untrained model earns none): each update's loss equals a float64 hand computation from the
log-probs the loss saw, normalised over its own mini-batch (grpo: mean over the mini-batch's
sequences; dapo: over its completion tokens), one mini-batch included (today's step); the first
update is on-policy (ratio exactly 1), later ones see the log-probs of the policy that sampled
(checked against a fresh copy of the initial model); the reference model runs once per
micro-batch and rollout step, whatever the number of updates; dual_clip reaches the loss only
when set."""
from __future__ import annotations

import pytest
import torch

from staged import grpo, minibatch, parallel, train
from staged.config import from_cli
from train_helpers import write_tiny_config


def fake_rewards(texts, samples, **kw):
    g = torch.Generator().manual_seed(4321 + len(texts))
    r = torch.rand(len(texts), generator=g)
    return {"reward": r, "accuracy": (r > 0.5).float(), "format": torch.zeros(len(texts))}


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory, embedded_dir):
    root = tmp_path_factory.mktemp("minibatch")
    path = write_tiny_config(root / "tiny.toml", root / "out", embedded_dir)
    yield path, parallel.init_distributed("cpu")


class Spy:
    """Records each policy_loss call (float64 copies) in order."""

    def __init__(self):
        self.calls = []

    def __call__(self, logp, old_logp, ref_logp, advantages, mask, **kw):
        loss, m = grpo.policy_loss(logp, old_logp, ref_logp, advantages, mask, **kw)
        self.calls.append({"logp": logp.detach().double().clone(), "old": old_logp, "ref": ref_logp,
                           "adv": advantages.detach().double().clone(), "mask": mask.detach().clone(),
                           "num_items": kw["num_items_in_batch"], "ratio_mean": m["ratio_mean"].item()})
        return loss, m


def run_step(run_cfg, embedded_dir, monkeypatch, overrides, *, stage_index=0, record_forward=False, prepare=None):
    """One GRPO step (global step 0) with AdamW; returns (record, policy_loss calls, forward calls of
    the policy, reference forward count, the model, the config). ``prepare(model)`` runs first."""
    path, d = run_cfg
    cfg = from_cli(["--config", str(path), *overrides])
    stage = cfg.stages[stage_index]
    monkeypatch.setattr(train, "compute_rewards", fake_rewards)
    spy = Spy()
    monkeypatch.setattr(train, "policy_loss", spy)
    torch.manual_seed(0)
    model, processor = train.build_model(embedded_dir, cfg, d, stage.freeze)
    ref = train.build_model(embedded_dir, cfg, d, [], trainable=False)[0] if stage.grpo.beta > 0 else None
    if prepare is not None:
        prepare(model)
    forwards, ref_calls = [], [0]
    if record_forward:
        real = getattr(model, train.LOGPROBS)

        def recorded(*args, **kw):
            out = real(*args, **kw)
            forwards.append({"args": args, "kw": kw, "grad": torch.is_grad_enabled()})
            return out

        setattr(model, train.LOGPROBS, recorded)
    if ref is not None:
        real_ref = getattr(ref, train.LOGPROBS)

        def counted(*args, **kw):
            ref_calls[0] += 1
            return real_ref(*args, **kw)

        setattr(ref, train.LOGPROBS, counted)
    opt, params = train.build_optimizer(model, stage)
    sp = train.sampling_params(stage, cfg, model, processor.tokenizer)
    samples = train.load_stage_data(stage, stage_index, cfg.seed)
    prompts = train.step_prompts(samples, stage, cfg.seed, stage_index, 0, d)
    _, dtype = parallel.mixed_precision(cfg.precision, d.device)
    rec = train.grpo_step(model, ref, opt, params, processor, stage, cfg, d, prompts, 0, sp, dtype)
    return rec, spy.calls, forwards, ref_calls[0], model, cfg


# ------------------------------------------------------------------------------------------
# splitting


def test_mini_batch_rows_keep_groups_and_do_not_depend_on_the_rank_count():
    assert minibatch.mini_batch_rows(4, 2, 1) == [list(range(8))]  # one mini-batch: today's rows, in order
    assert minibatch.mini_batch_rows(4, 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert minibatch.update_schedule(2, 3) == [0, 1, 0, 1, 0, 1]
    P, G, K = 8, 3, 4
    for W in (1, 2):  # the global prompts of each mini-batch as the ranks hold them (W divides M = P / K = 2)
        per = P // W
        glob = [sorted({(r * per * G + row) // G for r in range(W)
                        for row in minibatch.mini_batch_rows(per, G, K)[k]}) for k in range(K)]
        assert glob == [[i for i in range(P) if i % K == k] for k in range(K)], W
    with pytest.raises(ValueError, match="do not split into 4 mini-batches"):
        minibatch.mini_batch_rows(6, 2, 4)


# ------------------------------------------------------------------------------------------
# normalisation: a float64 hand computation of each update's loss


def hand_loss(calls, loss_type, eps_low=0.2, eps_high=0.3):
    """One update's loss from its micro-batches' inputs, float64, TRL semantics (beta 0)."""
    seq_means, tok_sum, tokens, rows = 0.0, 0.0, 0, 0
    for c in calls:
        logp, adv, mask = c["logp"], c["adv"], c["mask"].double()
        old = logp if c["old"] is None else c["old"].double()
        ratio = torch.exp(logp - old)
        a = adv[:, None]
        per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
        seq_means += float(((per_tok * mask).sum(-1) / mask.sum(-1).clamp_min(1)).sum())
        tok_sum += float((per_tok * mask).sum())
        tokens += int(mask.sum())
        rows += mask.shape[0]
    return (seq_means / rows if loss_type == "grpo" else tok_sum / tokens), tokens


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("mini,epochs", [(4, 1), (4, 2), (2, 1), (1, 2)])
def test_each_update_is_normalised_over_its_mini_batch(loss_type, mini, epochs, run_cfg, embedded_dir, monkeypatch):
    # 4 prompts x 4 rows, micro-batches of 3 rows (several per mini-batch, cut inside groups);
    # lr large enough that later updates see ratios far from 1.
    rec, calls, _, _, _, cfg = run_step(run_cfg, embedded_dir, monkeypatch, [
        "stages.0.grpo.beta=0.0", f"stages.0.grpo.loss_type={loss_type}", "stages.0.batch.micro_batch_size=3",
        f"stages.0.batch.mini_batch_prompts={mini}", f"stages.0.grpo.ppo_epochs={epochs}", "stages.0.lr=1e-3"])
    K = 4 // mini
    assert rec["updates"] == K * epochs == len(rec["loss_updates"]) == len(rec["clip_ratio_updates"])
    rows_per_update = 4 // K * 4
    per_update, i = [], 0
    for u in range(rec["updates"]):
        n = -(-rows_per_update // 3)  # micro-batches of this update
        per_update.append(calls[i:i + n])
        i += n
    assert i == len(calls)
    for u, cs in enumerate(per_update):
        assert sum(c["mask"].shape[0] for c in cs) == rows_per_update
        want, tokens = hand_loss(cs, loss_type)
        assert all(c["num_items"] == tokens for c in cs), (u, [c["num_items"] for c in cs], tokens)
        assert rec["loss_updates"][u] == pytest.approx(want, rel=1e-5, abs=1e-6), (u, rec["loss_updates"], want)
    assert rec["loss"] == pytest.approx(sum(rec["loss_updates"]) / rec["updates"], rel=1e-12)
    if rec["updates"] > 1:
        assert any(abs(c["ratio_mean"] - 1) > 1e-4 for c in per_update[-1]), "later updates should be off-policy"


# ------------------------------------------------------------------------------------------
# old log-probs: on-policy first, then the sampling policy's; the reference once per rollout


def test_first_update_on_policy_later_ones_against_the_sampling_policy(run_cfg, embedded_dir, monkeypatch):
    # 2 mini-batches x 2 epochs, one micro-batch each (8 rows), beta > 0: 4 updates.
    rec, calls, fwd, ref_calls, _, cfg = run_step(run_cfg, embedded_dir, monkeypatch, [
        "stages.0.batch.micro_batch_size=8", "stages.0.batch.mini_batch_prompts=2", "stages.0.grpo.ppo_epochs=2",
        "stages.0.lr=1e-3"], record_forward=True)
    assert rec["updates"] == 4 and len(calls) == 4
    assert ref_calls == 2, "the reference log-probs: once per micro-batch and rollout step"
    # forwards: the no-grad pass over mini-batch 1 (before any update), then the 4 updates'
    assert [f["grad"] for f in fwd] == [False, True, True, True, True]
    assert calls[0]["old"] is None and calls[0]["ratio_mean"] == 1.0 and rec["ratio_mean_updates"][0] == 1.0
    # The policy that sampled = a fresh copy of the initial weights, on the same micro-batches.
    _, d = run_cfg
    fresh, _ = train.build_model(embedded_dir, cfg, d, cfg.stages[0].freeze)
    initial = [getattr(fresh, train.LOGPROBS)(*fwd[j]["args"], **{**fwd[j]["kw"], "with_entropy": False})
               for j in (1, 0)]  # mini-batch 0 (its first update's forward), mini-batch 1 (the no-grad pass)
    for u, k in enumerate(minibatch.update_schedule(2, 2)):
        if u == 0:
            continue
        torch.testing.assert_close(calls[u]["old"], initial[k].detach(), rtol=0, atol=1e-6,
                                   msg=lambda m, u=u: f"update {u}: {m}")
        assert abs(calls[u]["ratio_mean"] - 1.0) > 1e-4, f"update {u}: the weights moved, the ratio should show it"


def test_rollout_old_logp_is_the_samplers_in_every_update(run_cfg, embedded_dir, monkeypatch):
    rec, calls, fwd, _, _, _ = run_step(run_cfg, embedded_dir, monkeypatch, [
        "stages.0.grpo.beta=0.0", "stages.0.grpo.old_logp=rollout", "stages.0.batch.micro_batch_size=8",
        "stages.0.batch.mini_batch_prompts=2"], record_forward=True)
    assert rec["updates"] == 2 and all(c["old"] is not None for c in calls)
    assert [f["grad"] for f in fwd] == [True, True], "no no-grad pass: the sampler's log-probs are the old ones"


# ------------------------------------------------------------------------------------------
# dual-clip reaches the loss only when set (the loss takes it as a keyword)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_dual_clip_is_passed_only_when_set(dual_clip, monkeypatch):
    seen = {}

    def fake_loss(*args, **kw):
        seen.update(kw)
        return torch.zeros(()), {}

    monkeypatch.setattr(grpo, "grpo_loss", fake_loss)
    cfg = from_cli(["stages.0.grpo.dual_clip=3.0"] if dual_clip else []).stages[0].grpo
    x = torch.zeros(2, 3)
    grpo.policy_loss(x, None, None, torch.zeros(2), x > -1, cfg=cfg, num_items_in_batch=6, world_size=1)
    assert ("dual_clip" in seen) == (dual_clip is not None)
    if dual_clip is not None:
        assert seen["dual_clip"] == 3.0


def test_reference_runs_its_own_vision_tower(run_cfg, embedded_dir, monkeypatch):
    """The rollout's reused image features are the policy's: the reference log-probs must come from
    the reference's own tower. The policy's tower is perturbed first so that the two differ."""
    from staged.models.loading import vision_module

    def perturb(model):
        with torch.no_grad():
            for p in vision_module(model).parameters():
                p.mul_(1.5)

    rec, calls, fwd, _, _, cfg = run_step(run_cfg, embedded_dir, monkeypatch, [
        "stages.0.batch.micro_batch_size=16", "rollout.reuse_vision_features=true"],
        record_forward=True, prepare=perturb)
    assert "image_features" in fwd[0]["kw"], "the policy forward should take the rollout's features"
    _, d = run_cfg
    ref, _ = train.build_model(embedded_dir, cfg, d, [], trainable=False)
    kw = {k: v for k, v in fwd[0]["kw"].items() if k not in ("image_features", "tower_in_forward", "with_entropy")}
    with torch.no_grad():
        want = getattr(ref, train.LOGPROBS)(*fwd[0]["args"], **kw)
    torch.testing.assert_close(calls[0]["ref"], want, rtol=0, atol=1e-6)
    assert rec["kl"] > 1e-6
