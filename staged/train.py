"""The staged trainer: GRPO (or SFT) stages run in order, each starting from the last one's weights.

    python -m staged.train                                   # the embedded default, CPU, minutes
    python -m staged.train --config paper_qwen2_5_vl model=/ckpt/Qwen2.5-VL-7B-Instruct
    torchrun --nproc_per_node=8 -m staged.train --config recipe.toml --stages.0.lr 1e-6

One GRPO step, top to bottom:
    prompts of this rank -> rollout: G completions each (KV-cache decode, per-row seeded)
    -> rewards (verifier per task) -> group advantages
    -> per micro-batch: policy forward to the final hidden state, fused lm_head x log-prob of the
       sampled tokens (+ entropy), reference log-probs when beta > 0, the GRPO loss, backward
    -> clip the global grad norm -> skip the step if anything is non-finite -> optimizer step
    -> metrics (reduced over ranks), checkpoint every K steps and at each stage end.
FSDP2 wrapping (staged.parallel), checkpoints (staged.checkpoint), sampling (staged.rollout),
the loss (staged.grpo) and logging (staged.metrics) are called from here, never inherited.

Host syncs per GRPO step, all named where they happen: the "all finished" check of the decode
loop every few tokens, copying completions to the host to decode them for the reward, one
all-reduce of the step's token counts (the dapo normalisers) and one of each update's metrics
(which also decides whether the update was finite).
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from staged import checkpoint, metrics, minibatch, packed_step, parallel, preflight, vision_dummy, vision_reuse
from staged import resume as resume_guard
from staged.config import StageConfig, TrainConfig, from_cli
from staged.data import images as image_cache
from staged.data.prompting import build_generation_batch, build_sft_batch
from staged.grpo import VocabMask, group_advantages, micro_batch_weight, policy_loss, token_logprobs
from staged.models.loading import (decoder_layers, input_embeddings, language_model, load_model_and_processor,
                                   load_processor, vision_module)
from staged.rewards import compute_rewards
from staged.rollout import SamplingParams, generate, model_inputs, position_ids, row_seed, select_rows
from staged.rollout import prefill as rollout_prefill
from staged.vision_reuse import StepVisionFeatures

LOGPROBS = "staged_logprobs"  # the FSDP forward method bound onto the policy and reference models


# ------------------------------------------------------------------------------------------
# setup helpers


def resolve_model_path(cfg: TrainConfig, d: parallel.Dist) -> Path:
    """``embedded``: build the tiny checkpoint once (rank 0 first; the builder is race-safe).
    A Hugging Face model id (``Qwen/Qwen3-VL-8B-Instruct``) that is not a local directory: its
    snapshot in the local Hugging Face cache (never a download at train time)."""
    if cfg.model != "embedded":
        return local_checkpoint(cfg.model)
    from staged.models.embedded import build_embedded_checkpoint

    path = embedded_path(cfg)
    if d.is_main:
        build_embedded_checkpoint(path, seed=cfg.seed)
    parallel.barrier()
    return build_embedded_checkpoint(path, seed=cfg.seed)


def embedded_path(cfg: TrainConfig) -> Path:
    """The embedded checkpoint of ``cfg.seed``: one directory per seed, so that runs of different
    seeds at once (an ablation's) do not replace each other's weights while another loads them."""
    base = Path(cfg.embedded_dir)
    return base if cfg.seed == 0 else base.with_name(f"{base.name}-seed{cfg.seed}")


def local_checkpoint(model: str) -> Path:
    """``model`` as a local directory: itself when it exists (or is not shaped like a model id),
    else the id's snapshot in the Hugging Face cache; an error naming both when neither exists."""
    p = Path(model).expanduser()
    parts = model.split("/")
    if p.exists() or len(parts) != 2 or not all(parts) or model.startswith((".", "~")):
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any miss: say what to do
        raise FileNotFoundError(
            f"model {model!r}: no such local directory, and no snapshot of the Hugging Face model {model!r} in the "
            f"local cache ({type(e).__name__}); download it first (`hf download {model}`) or pass "
            f"model=/path/to/checkpoint") from e


def build_model(path: Path, cfg: TrainConfig, d: parallel.Dist, freeze: list[str], *, trainable: bool = True):
    """Load (fp32 master weights), freeze, shard with FSDP2, bind the log-prob forward.

    Only rank 0 reads the checkpoint's weights; the other ranks build the model on the meta device
    and receive their shards from rank 0 (parallel.shard_from_rank0 says why)."""
    model, processor = load_model_and_processor(path, dtype=torch.float32, attn_implementation=cfg.attn_implementation,
                                                meta=d.world_size > 1 and not d.is_main)
    set_frozen(model, freeze if trainable else ["all"])
    parallel.shard_from_rank0(model, d, precision=cfg.precision,
                              activation_checkpointing=cfg.fsdp.activation_checkpointing and trainable,
                              reshard_after_forward=cfg.fsdp.reshard_after_forward)
    parallel.bind_forward_method(model, LOGPROBS, token_logprobs)
    parallel.bind_forward_method(model, packed_step.PACKED_LOGPROBS, packed_step.packed_token_logprobs)
    parallel.bind_forward_method(model, vision_reuse.FORWARD_METHOD, vision_reuse.tower_features)
    parallel.bind_forward_method(model, rollout_prefill.PREFILL_METHOD, rollout_prefill.packed_prefill)
    model.train(trainable)
    return model, processor


def set_frozen(model, freeze: list[str]) -> None:
    """requires_grad = False on the named modules, True elsewhere (see StageConfig.freeze)."""
    for p in model.parameters():
        p.requires_grad_("all" not in freeze)
    groups = {
        "vision": lambda: [vision_module(model)],
        "merger": lambda: [vision_module(model).merger],
        "embed": lambda: [input_embeddings(model)],
        "decoder": lambda: list(decoder_layers(model)) + [language_model(model).norm],
        "lm_head": lambda: [model.get_output_embeddings()],
    }
    for name in freeze:
        if name in groups:
            for m in groups[name]():
                for p in m.parameters():
                    p.requires_grad_(False)


def build_optimizer(model, stage: StageConfig):
    """AdamW over the trainable parameters; the vision tower in its own group (vision_lr_scale)."""
    vision = {id(p) for p in vision_module(model).parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in vision], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in vision], "lr_scale": stage.vision_lr_scale}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = stage.lr_at(0) * g["lr_scale"]
    return torch.optim.AdamW(groups, weight_decay=stage.weight_decay, foreach=True), params


def load_stage_data(stage: StageConfig, index: int, seed: int, processor=None):
    """The stage's samples; rows whose prompt exceeds data.max_prompt_tokens dropped (staged.preflight
    counted the same rows for epochs -> steps)."""
    samples = _stage_samples(stage, index, seed)
    samples, _ = preflight.drop_overlong(samples, stage, processor)
    if not samples:
        raise ValueError(f"stage {stage.name!r}: no samples of <= {stage.data.max_prompt_tokens} prompt tokens")
    return samples


def _stage_samples(stage: StageConfig, index: int, seed: int):
    if stage.data.synthetic is not None:
        from staged.data.synthetic import make_synthetic_dataset

        data_seed = stage.data.seed if stage.data.seed is not None else seed + 1000 * index
        if isinstance(stage.data.synthetic, str):
            return make_synthetic_dataset(stage.data.synthetic, stage.data.num_samples, seed=data_seed)
        # a list of kinds (the merged baseline): num_samples of each, shuffled into one dataset
        mixed = [s for kind in stage.data.synthetic
                 for s in make_synthetic_dataset(kind, stage.data.num_samples, seed=data_seed)]
        random.Random(f"staged-mix:{data_seed}").shuffle(mixed)
        return mixed
    from staged.data.files import load_dataset_files

    # verify_images=False: the preflight (staged.preflight) verified every image; headers are still read
    ds = load_dataset_files(stage.data.files, image_dir=stage.data.image_dir, format=stage.data.format,
                            fields=stage.data.fields or None, on_bad_row=stage.data.on_bad_row,
                            default_task=stage.data.default_task, verify_images=False)
    if not ds.samples:
        raise ValueError(f"stage {stage.name!r}: no samples in {stage.data.files}")
    return ds.samples


def epoch_order(samples, stage: StageConfig, seed: int, stage_index: int, epoch: int) -> list[int]:
    """The order of one pass over the stage's data: a seeded permutation (shuffle) or by pass_rate,
    easy (high) first, ties and unknowns in file order (easy_to_hard)."""
    n = len(samples)
    if stage.curriculum == "easy_to_hard":
        return sorted(range(n), key=lambda i: -(samples[i].pass_rate if samples[i].pass_rate is not None else 0.5))
    return np.random.default_rng([seed, stage_index, epoch]).permutation(n).tolist()


def prompt_options(stage: StageConfig) -> dict:
    """How a stage's rows become prompts: system message, template, image pixel bounds."""
    return {"system_prompt": stage.system_prompt, "prompt_template": stage.prompt_template,
            "min_pixels": stage.data.min_pixels, "max_pixels": stage.data.max_pixels}


def step_prompts(samples, stage: StageConfig, seed: int, stage_index: int, step: int, d: parallel.Dist):
    """This rank's prompts of ``step`` and their index in the global step batch. Stream position
    q = step * P + i goes to epoch q // n: the data position is (stage, step), nothing else.
    drop_last (EasyR1's loader): epoch e is steps [e * k, (e + 1) * k) with k = n // P, each a slice
    of that epoch's order, its last n % P rows unused."""
    P, n = stage.batch.prompts_per_step, len(samples)
    per_rank = P // d.world_size
    cache: dict[int, list[int]] = {}
    out = []
    for i in range(d.rank * per_rank, (d.rank + 1) * per_rank):
        q = step * P + i
        e = q // n
        if stage.drop_last:
            k = n // P
            if k < 1:
                raise ValueError(f"stage {stage.name!r}: drop_last with {n} rows < prompts_per_step={P}")
            e, q = step // k, (step % k) * P + i
        if e not in cache:
            cache[e] = epoch_order(samples, stage, seed, stage_index, e)
        out.append((i, samples[cache[e][q % n]]))
    return out


def sampling_params(stage: StageConfig, cfg: TrainConfig, model, tokenizer) -> SamplingParams:
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    # Vision placeholders and vocabulary rows past the tokenizer are never sampled.
    vision = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    suppress = {tokenizer.convert_tokens_to_ids(t) for t in vision} - {None, tokenizer.unk_token_id}
    suppress |= set(range(len(tokenizer), model.config.get_text_config().vocab_size))
    g = stage.grpo
    r = cfg.rollout
    return SamplingParams(max_new_tokens=g.max_response_tokens, temperature=g.temperature, top_p=g.top_p,
                          eos_token_ids=tuple(sorted(eos)), pad_token_id=tokenizer.pad_token_id,
                          check_every=cfg.finished_check_every, batch_size=stage.batch.rollout_batch_size,
                          suppress_token_ids=tuple(sorted(suppress)), engine=r.engine, block_size=r.block_size,
                          kv_cache_tokens=r.kv_cache_tokens, kv_cache_memory_fraction=r.kv_cache_memory_fraction,
                          prefill_tokens=r.prefill_tokens, reuse_vision_features=r.reuse_vision_features,
                          cuda_graphs=r.cuda_graphs, attention=r.attention, invariant_rows=r.invariant_rows)


def inject_fault(d: parallel.Dist, global_step: int, point: str = "step") -> None:
    """Fault injection for the reliability tests: ``STAGED_INJECT_FAULT=raise:RANK:STEP`` raises on
    rank RANK before global step STEP (0-based) runs, ``stop:RANK:STEP`` stops it (SIGSTOP), as an
    exception or a frozen process on one GPU would, while the other ranks enter the step.
    ``raise:RANK:STEP:eval``: before the evaluation due after STEP global steps (after their
    checkpoint, before the eval is logged)."""
    spec = os.environ.get("STAGED_INJECT_FAULT")
    if not spec:
        return
    kind, rank, step, *where = spec.split(":")
    if int(rank) != d.rank or int(step) != global_step or (where[0] if where else "step") != point:
        return
    if kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    raise RuntimeError(f"injected fault (STAGED_INJECT_FAULT={spec}) on rank {d.rank} at global step {global_step}")


def on_rank0(d: parallel.Dist, fn):
    """``fn()`` on rank 0 (None elsewhere). Its refusal to start is raised on every rank, so that
    all of them stop with one message instead of waiting for rank 0 in the next collective."""
    out, refusal = None, None
    if d.is_main:
        try:
            out = fn()
        except resume_guard.RefuseStart as e:
            refusal = str(e)
    refusal = parallel.broadcast_object(refusal)
    if refusal:
        raise resume_guard.RefuseStart(refusal)
    return out


def check_geometry(cfg: TrainConfig, d: parallel.Dist) -> None:
    for i, s in enumerate(cfg.stages):
        if s.batch.prompts_per_step % d.world_size:
            raise ValueError(f"stages[{i}].batch.prompts_per_step: {s.batch.prompts_per_step} prompts do not split "
                             f"evenly over {d.world_size} ranks")
        if s.batch.mini_batch_prompts % d.world_size:
            raise ValueError(f"stages[{i}].batch.mini_batch_prompts: {s.batch.mini_batch_prompts} prompts do not "
                             f"split evenly over {d.world_size} ranks")


# ------------------------------------------------------------------------------------------
# the two kinds of step


@dataclass
class PaddedMicroBatch:
    """Rows of one padded micro-batch: model inputs [B, P + C], the completion columns' targets,
    mask and sampler log-probs [B, C], advantages [B] (the packed twin: packed_step.PackedItem)."""

    inputs: dict
    targets: torch.Tensor
    start: int
    mask: torch.Tensor
    sampler_logp: torch.Tensor
    advantages: torch.Tensor
    num_rows: int
    sample_rows: list[int]  # their rollout rows (which prompt's vision features they take)


def padded_micro_batches(batch, ro, comp_ids, comp_len, p_len, adv, rows_in, micro_batch_size, d, dtype):
    """``rows_in`` (rollout rows, one mini-batch) in consecutive chunks, each micro-batch trimmed to
    its own longest prompt and completion."""
    Tp = ro.prompt_ids.shape[1]
    for r0 in range(0, len(rows_in), micro_batch_size):
        rows = rows_in[r0:r0 + micro_batch_size]
        P, C = max(p_len[r] for r in rows), max(1, int(comp_len[rows].max()))
        cols = list(range(Tp - P, Tp + C))
        mb = select_rows(batch, rows)
        ids = torch.cat([ro.prompt_ids[rows, Tp - P:], comp_ids[rows, :C]], 1)
        attn = torch.cat([ro.prompt_mask[rows, Tp - P:], ro.completion_mask[rows, :C].cpu()], 1)
        mb.update(input_ids=ids, attention_mask=attn, position_ids=ro.position_ids[:, rows][:, :, cols])
        inputs = model_inputs(mb, d.device, dtype)
        yield PaddedMicroBatch(inputs, inputs["input_ids"][:, P:], P, ro.completion_mask[rows, :C].to(d.device),
                               ro.logprobs[rows, :C].to(d.device), adv[rows], len(rows), rows)


def grpo_step(model, ref_model, optimizer, params, processor, stage, cfg, d, prompts, global_step, sp, dtype):
    """One GRPO step on this rank's prompts. Returns the metrics (reduced over ranks)."""
    g, G = stage.grpo, stage.batch.group_size
    t0 = time.perf_counter()

    # ---- rollout: G rows per prompt, each seeded by (run seed, step, global row index)
    samples = [s for _, s in prompts for _ in range(G)]
    base = build_generation_batch(processor, [s for _, s in prompts], **prompt_options(stage))
    base["images_per_row"] = [len(s.images) for _, s in prompts]
    # Positions once per prompt (transformers' get_rope_index walks rows in Python), copied to its G rows.
    base["position_ids"] = position_ids(model, base["input_ids"], base["attention_mask"], base.get("image_grid_thw"))
    batch = select_rows(base, [j for j in range(len(prompts)) for _ in range(G)])
    batch["prompt_index"] = [j for j in range(len(prompts)) for _ in range(G)]  # G rows share one prefill
    seeds = torch.tensor([row_seed(cfg.seed, global_step, i * G + k) for i, _ in prompts for k in range(G)])
    ro = generate(model, batch, sp, seeds=seeds, device=d.device, dtype=dtype)
    t_rollout = time.perf_counter() - t0

    # ---- rewards: decode on the host (host sync: the completions must leave the device here)
    comp_ids = ro.completion_ids.cpu()
    comp_len = ro.completion_mask.sum(-1).cpu()
    texts = processor.batch_decode(comp_ids, skip_special_tokens=True)
    scores = compute_rewards(texts, samples, kind=stage.reward.kind, format_weight=stage.reward.format_weight)

    # ---- advantages: relative to the group (all G rows of a prompt live on this rank)
    adv = group_advantages(scores["reward"], G, std_normalize=g.std_normalize).to(d.device)

    # ---- experience: this rank's rows of each mini-batch (batch.mini_batch_prompts; staged.minibatch),
    #      each split into micro-batches: padded (each trimmed to its own longest prompt /
    #      completion) or packed under a token budget (cfg.packing; staged.packed_step)
    K, W = stage.batch.num_mini_batches, d.world_size
    updates = minibatch.update_schedule(K, g.ppo_epochs)
    rows_of = minibatch.mini_batch_rows(len(prompts), G, K)
    p_len = ro.prompt_mask.sum(-1).tolist()
    c_len, plans, svf = comp_len.tolist(), None, None
    if cfg.packing.enabled:  # this rank's micro-batches of each mini-batch; G rows of a prompt stay together
        plans = [[[rows[i] for i in mb] for mb in packed_step.plan_rank(
            [p_len[r] + c_len[r] for r in rows], G, cfg.packing.token_budget, stage.batch.micro_batch_size)]
            for rows in rows_of]
    # Host sync: per mini-batch the global completion-token count (dapo's normaliser) and image
    # count (none: the vision tower's dummy-only zero gradients are dropped, staged.vision_dummy),
    # (packed) each rank's micro-batch count of each mini-batch: every rank runs the largest, FSDP
    # collectives line up; and the rollout's metric sums. One all-reduce.
    red = torch.zeros(2 * K + W * K + 5, device=d.device)
    red[:K] = torch.tensor([float(comp_len[rows].sum()) for rows in rows_of])
    red[K:2 * K] = torch.tensor([float(sum(batch["images_per_row"][r] for r in rows)) for rows in rows_of])
    if plans is not None:
        red[2 * K + d.rank * K: 2 * K + (d.rank + 1) * K] = torch.tensor([float(len(p)) for p in plans])
    red[-5:] = torch.cat([torch.stack([scores[k].sum() for k in ("reward", "accuracy", "format")]).float(),
                          torch.tensor([float((comp_len >= sp.max_new_tokens).sum()), float(ro.prompt_mask.sum())])])
    red = parallel.all_reduce_sum(red).tolist()
    num_items, images_all = [int(x) for x in red[:K]], red[K:2 * K]
    rew, acc, fmt, trunc, prompt_tok = red[-5:]
    # Vision features, once per distinct image (staged.vision_reuse). The rollout's stand in for the
    # policy's tower in every micro-batch (padded or packed), the tower's gradient from one deferred
    # pass below: valid while the tower's weights are the rollout's (one update, or a frozen tower);
    # otherwise each training forward runs the tower once per distinct image of its micro-batch.
    # The reference runs its own tower once per mini-batch (ref_logprobs). So no forward needs the
    # packed micro-batches' pixel values.
    reuse = cfg.rollout.reuse_vision_features and vision_reuse.supports_reuse(model)
    tower_trains = any(p.requires_grad for p in vision_module(model).parameters())
    if reuse and ro.vision_features is not None and (len(updates) == 1 or not tower_trains):
        svf = StepVisionFeatures(ro.vision_features, ro.prompt_index, tower_trains)
    if plans is not None:
        pack_samples = packed_step.rollout_samples(batch, ro.prompt_ids.cpu(), p_len, comp_ids, c_len)
        pack_cfg = packed_step.PackingConfig.from_model(model)
        counts = [int(max(red[2 * K + r * K + k] for r in range(W))) for k in range(K)]
        items = [packed_step.collate_items(pack_samples, plans[k], counts[k], pack_cfg, comp_ids=comp_ids,
                                           comp_len=c_len, advantages=adv, sampler_logp=ro.logprobs, device=d.device,
                                           dtype=dtype, with_pixels=not reuse)
                 for k in range(K)]
        minis = [minibatch.MiniBatch(rows, lambda it=it: it, num_items[k])
                 for k, (rows, it) in enumerate(zip(rows_of, items))]
    else:
        # Built on the fly at each use (a whole rollout's inputs may not fit on the device at once).
        minis = [minibatch.MiniBatch(rows, lambda rows=rows: padded_micro_batches(
            batch, ro, comp_ids, comp_len, p_len, adv, rows, stage.batch.micro_batch_size, d, dtype),
            num_items[k]) for k, rows in enumerate(rows_of)]
    # The sampler's vocabulary: the trainer's log-probs are normalised over the rows it can draw.
    vocab = VocabMask.build(sp.suppress_token_ids, model.config.get_text_config().vocab_size, d.device)

    prompt_of = batch["prompt_index"]  # rollout row -> its prompt = its row of `base`
    ref_feats = {}  # the reference's features of the current mini-batch's prompts (ref_logprobs)

    def forward(m, mb, *, with_entropy):
        if plans is not None:
            method, args = packed_step.PACKED_LOGPROBS, (mb.batch, mb.rows, mb.targets)
        else:
            method, args = LOGPROBS, (mb.inputs, mb.targets, mb.start)
        # the features of the rows in their order (packed: slot order = span order)
        kw, prompts = {}, [prompt_of[r] for r in mb.sample_rows]
        if reuse and m is ref_model:  # the rollout's features are the policy's: the reference's own
            kw = {"image_features": vision_reuse.rows_features(ref_feats, prompts), "tower_in_forward": False}
        elif svf is not None:
            kw = {"image_features": svf.for_rows(mb.sample_rows), "tower_in_forward": False}
        elif reuse:  # stale rollout features: the tower in this forward, once per distinct image
            images = vision_reuse.PromptImages(base, prompts, d.device, dtype)
            kw = {"images": images} if images.pixel_values is not None else {}  # none: the forward's dummy
        return getattr(m, method)(*args, temperature=g.temperature, with_entropy=with_entropy, vocab=vocab, **kw)

    def reference_features(mini):
        """The reference's features of a mini-batch's prompts (packed: its fillers' too), one tower
        call through its root's forward method (no grad). Every rank makes it once per mini-batch:
        ranks > 1 without an image show it a zero one, so that the tower's all-gather lines up."""
        rows = mini.rows if plans is None else [r for it in mini.micro() for r in it.sample_rows]
        images = vision_reuse.PromptImages(base, [prompt_of[r] for r in rows], d.device, dtype)
        if images.pixel_values is None and W > 1:
            vision_reuse.image_features(ref_model, *vision_dummy.dummy_image(ref_model))
        return images.per_prompt(ref_model, vision_reuse.image_features)

    def ref_logprobs(mini, i, mb):  # once per rollout step: at a micro-batch's first use
        if ref_model is not None and i not in mini.ref_logp:
            with torch.no_grad():
                if reuse and i == 0:  # a mini-batch's micro-batches come in order, one after another
                    ref_feats.clear()
                    ref_feats.update(reference_features(mini))
                mini.ref_logp[i] = forward(ref_model, mb, with_entropy=False)
                parallel.reshard(ref_model)
        return mini.ref_logp.get(i)

    # Old log-probs for the updates after the first (recompute): the policy that sampled, in one
    # no-grad pass before the first update. Mini-batch 0's come from the first update's forward.
    recompute_old = g.old_logp == "recompute" and len(updates) > 1
    if recompute_old:
        with torch.no_grad():
            for mini in minis[1:]:
                for i, mb in enumerate(mini.micro()):
                    mini.old_logp[i] = forward(model, mb, with_entropy=False)
                    ref_logprobs(mini, i, mb)
            parallel.reshard(model)

    # ---- learning: one optimizer update per mini-batch and epoch (gradient accumulation over its
    #      micro-batches), each skipped when its loss or gradient is not finite
    per_update = []
    for u, k in enumerate(updates):
        mini = minis[k]
        sums = torch.zeros(8, device=d.device)  # loss, entropy*tok, kl*tok, clip*tok, ratio*tok, tok, logp diff*tok, rows
        for i, mb in enumerate(mini.micro()):
            logp, entropy = forward(model, mb, with_entropy=True)
            ref_logp = ref_logprobs(mini, i, mb)
            sampler_logp = mb.sampler_logp
            if g.old_logp == "rollout":
                old_logp = sampler_logp
            else:  # the first update on-policy (None: logp detached, ratio 1); later ones the sampling policy's
                old_logp = None if u == 0 else mini.old_logp[i]
                if u == 0 and recompute_old:
                    mini.old_logp[i] = logp.detach()
            loss, m = policy_loss(logp, old_logp, ref_logp, mb.advantages, mb.mask, cfg=g,
                                  num_items_in_batch=mini.num_items, world_size=W,
                                  sampling_logp=sampler_logp if g.rollout_is_correction else None,
                                  cu_seqlens=mb.cu_seqlens if plans is not None else None)
            # A packed filler micro-batch (num_rows 0) runs forward and backward for FSDP at weight 0.
            w = micro_batch_weight(g.loss_type, mb.num_rows, len(mini.rows)) if mb.num_rows else 0.0
            (loss * w).backward()

            with torch.no_grad():
                fm = mb.mask.float() * float(mb.num_rows > 0)
                tok = fm.sum()
                sums += torch.stack([
                    loss.detach() * w, (entropy.detach() * fm).sum(), m.get("kl", torch.zeros(())).to(tok) * tok,
                    m["clip_ratio/region_mean"].to(tok) * tok, m["ratio_mean"].to(tok) * tok, tok,
                    ((logp.detach() - sampler_logp).abs() * fm).sum(),
                    torch.tensor(float(mb.num_rows), device=d.device)])

        if svf is not None:  # the tower's gradient: one pass over the distinct images (every rank)
            svf.backward_through_tower(model, *(model_inputs(base, d.device, dtype).get(k)
                                                for k in ("pixel_values", "image_grid_thw")))

        # ---- optimizer step (skipped when the loss or the gradient is not finite)
        if not images_all[k]:
            vision_dummy.drop_vision_grads(model)
        grad_norm = parallel.grad_norm_and_clip(params, stage.max_grad_norm)
        # Host sync: the update's metrics, reduced over ranks; they also say whether it is finite.
        s = parallel.all_reduce_sum(sums).tolist()
        s[0] /= W
        gn = float(grad_norm)
        finite = math.isfinite(s[0]) and math.isfinite(gn)
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        per_update.append((s, gn, finite))

    # ---- metrics of the step: rollout-level ones, and the updates' (token-weighted over all updates)
    n = len(per_update)
    loss_v, gn = sum(s[0] for s, _, _ in per_update) / n, sum(x for _, x, _ in per_update) / n
    _, ent, kl, clip, ratio, tok_all, diff, _ = [sum(col) for col in zip(*(s for s, _, _ in per_update))]
    rows_all, tok = float(len(samples) * W), float(sum(num_items))
    dt = time.perf_counter() - t0
    return {
        "reward": rew / rows_all, "accuracy": acc / rows_all, "format": fmt / rows_all,
        "response_length": tok / rows_all, "truncated": trunc / rows_all,
        "entropy": ent / max(tok_all, 1), "kl": kl / max(tok_all, 1), "clip_ratio": clip / max(tok_all, 1),
        "ratio_mean": ratio / max(tok_all, 1), "sampler_logp_diff": diff / max(tok_all, 1),
        "loss": loss_v, "grad_norm": gn, "tokens_per_s": (tok + prompt_tok) / dt, "step_time_s": dt,
        "rollout_time_s": t_rollout, "skipped": not all(f for _, _, f in per_update),
        "updates": n, "skipped_updates": sum(not f for _, _, f in per_update),
        "loss_updates": [s[0] for s, _, _ in per_update], "grad_norm_updates": [x for _, x, _ in per_update],
        "clip_ratio_updates": [s[3] / max(s[5], 1) for s, _, _ in per_update],
        "ratio_mean_updates": [s[4] / max(s[5], 1) for s, _, _ in per_update],
    }


def sft_step(model, optimizer, params, processor, stage, cfg, d, prompts, dtype):
    """One supervised step on reference responses (format warm-up, or an sft stage)."""
    t0 = time.perf_counter()
    samples = [s for _, s in prompts]
    missing = [i for i, s in enumerate(samples) if s.reference_response is None]
    if missing:
        raise ValueError(f"stage {stage.name!r}: SFT needs reference_response, missing on {len(missing)} of "
                         f"{len(samples)} samples of this step")
    batch = build_sft_batch(processor, samples, [s.reference_response for s in samples], **prompt_options(stage))
    batch["images_per_row"] = [len(s.images) for s in samples]
    batch["position_ids"] = position_ids(model, batch["input_ids"], batch["attention_mask"],
                                         batch.get("image_grid_thw"))
    lab_mask = batch["labels"][:, 1:] != -100
    # Host sync: label tokens over all ranks, the token-mean normaliser, and the image count (none:
    # the vision tower's dummy-only zero gradients are dropped, staged.vision_dummy).
    red = parallel.all_reduce_sum(torch.tensor([float(lab_mask.sum()), float(sum(batch["images_per_row"]))],
                                               device=d.device))
    n_tok, images_all = red[0], float(red[1])
    total = torch.zeros((), device=d.device)
    B = len(samples)
    for r0 in range(0, B, stage.batch.micro_batch_size):
        rows = list(range(r0, min(B, r0 + stage.batch.micro_batch_size)))
        inputs = model_inputs(select_rows(batch, rows), d.device, dtype)
        logp = getattr(model, LOGPROBS)(inputs, inputs["input_ids"][:, 1:], 1, temperature=1.0)
        m = lab_mask[rows].to(d.device)
        # sum over this rank's label tokens / global count; x world size undoes FSDP's rank mean
        loss = -(logp * m).sum() / n_tok * d.world_size
        loss.backward()
        total += loss.detach()
    if not images_all:
        vision_dummy.drop_vision_grads(model)
    grad_norm = parallel.grad_norm_and_clip(params, stage.max_grad_norm)
    loss_v = float(parallel.all_reduce_sum(total)) / d.world_size  # host sync: logging + finiteness
    gn = float(grad_norm)
    finite = math.isfinite(loss_v) and math.isfinite(gn)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {"loss": loss_v, "grad_norm": gn, "tokens_per_s": float(batch["attention_mask"].sum()) * d.world_size / dt,
            "step_time_s": dt, "skipped": not finite}


# ------------------------------------------------------------------------------------------
# the run


def export_dir(cfg: TrainConfig, index: int, stage: StageConfig) -> Path:
    return Path(cfg.output_dir) / "hf" / f"stage{index}-{stage.name}"


def eval_due(cfg: TrainConfig, si: int, stage_end: bool, global_step: int) -> bool:
    """Whether the evaluation runs after global step ``global_step``: every eval.every steps, and at
    the end of a stage (every stage, or the last one: eval.stages). One eval when both are due."""
    e = cfg.eval
    if not e.enabled:
        return False
    if stage_end and (e.stages == "all" or si == len(cfg.stages) - 1):
        return True
    return bool(e.every) and global_step % e.every == 0


def run_eval(cfg: TrainConfig, d, model, processor, si: int, stage: StageConfig, global_step: int,
             stage_step: int) -> dict:
    """cfg.eval: staged.eval.evaluate on the held-out sets (every rank takes a share), greedy at
    eval.temperature 0, else eval.samples completions per prompt at eval.temperature / eval.top_p
    (seeded by the run seed: the same completions for the same weights, also after a resume).
    Returns the metrics record (kind "eval": eval/<benchmark>/<metric>, eval/average/...)."""
    from staged.data.synthetic import make_synthetic_dataset
    from staged.eval import evaluate, load_benchmarks

    e = cfg.eval
    seed = e.seed if e.seed is not None else cfg.seed + 1_000_003
    sets = {kind: make_synthetic_dataset(kind, e.n, seed=seed) for kind in e.synthetic}
    if e.files:
        sets.update(load_benchmarks(e.files, limit=e.n or None, image_dir=e.image_dir, fields=e.fields or None,
                                    verify_images=False))
    greedy = e.temperature == 0
    with torch.no_grad():
        res = evaluate(model, processor, sets, greedy=greedy, temperature=e.temperature or 1.0, top_p=e.top_p,
                       samples=e.samples, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                       seed=cfg.seed, device=d.device, progress=False, keep_completions=False,
                       **prompt_options(stage))
    rec = {"step": global_step, "stage": si, "stage_name": stage.name, "stage_step": stage_step, "kind": "eval",
           "eval_temperature": e.temperature, "eval_top_p": 1.0 if greedy else e.top_p,
           "eval_samples": 1 if greedy else e.samples, "eval_seconds": res["seconds"]}
    keys = ("accuracy", "format", "response_tokens", "truncated") + (() if greedy or e.samples == 1
                                                                      else (f"pass@{e.samples}",))
    for name, m in [*res["benchmarks"].items(), ("average", res["average"])]:
        for key in keys:
            rec[f"eval/{name}/{key}"] = m[key]
    return rec


def evaluate_and_log(cfg, d, model, processor, si, stage, global_step, stage_step, logger, log) -> None:
    inject_fault(d, global_step, point="eval")
    rec = run_eval(cfg, d, model, processor, si, stage, global_step, stage_step)
    logger.log(rec)
    names = [k.split("/")[1] for k in rec if k.endswith("/accuracy")]
    how = "greedy" if rec["eval_temperature"] == 0 else (f"T={rec['eval_temperature']}, top-p {rec['eval_top_p']}, "
                                                          f"{rec['eval_samples']} per prompt")
    log(f"stage {si} '{stage.name}' step {stage_step} eval: " + ", ".join(
        f"{n} {100 * rec[f'eval/{n}/accuracy']:.1f}%" for n in names) + f" ({how}, {rec['eval_seconds']:.1f} s)")


def eval_missing(cfg: TrainConfig, d, global_step: int) -> bool:
    """Whether metrics.jsonl lacks the eval record of ``global_step`` (rank 0 reads, all ranks learn):
    an eval due right after the checkpoint we resume from, lost to the crash, is redone."""
    path = Path(cfg.output_dir) / metrics.METRICS_FILE
    missing = None
    if d.is_main:
        missing = not any(r.get("kind") == "eval" and r.get("step") == global_step for r in metrics.read_jsonl(path))
    return bool(parallel.broadcast_object(missing))


def run_stages(cfg, d, model, processor, path, dtype, state, resume, logger, bar, identity=None) -> None:
    """The stage schedule: each stage's setup, then its steps (the body of ``train``)."""
    log = (bar.write if bar is not None else print) if d.is_main else (lambda *a, **k: None)
    tokenizer = processor.tokenizer
    ckpt_dir = cfg.ckpt_dir
    global_step = state["global_step"]
    ref_model = None  # built on the first stage with beta > 0, refreshed at each stage start
    out_dtype = checkpoint.export_dtype(cfg.export_dtype, path)

    for si, stage in enumerate(cfg.stages):
        if si < state["stage"] or (si == state["stage"] and state["stage_step"] >= stage.steps):
            # Done before the checkpoint we resumed from; a kill between that stage-end
            # checkpoint and its export leaves the export to do.
            if si == state["stage"] and cfg.export_hf and not (export_dir(cfg, si, stage) / "config.json").exists():
                checkpoint.load(resume, model=model, optimizer=None, dist_info=d)
                checkpoint.export_hf(model, processor, export_dir(cfg, si, stage), d, out_dtype)
            # ... and its stage-end eval (cfg.eval), when the kill came before it was logged
            if si == state["stage"] and eval_due(cfg, si, True, global_step) and eval_missing(cfg, d, global_step):
                checkpoint.load(resume, model=model, optimizer=None, dist_info=d)
                evaluate_and_log(cfg, d, model, processor, si, stage, global_step, stage.steps, logger, log)
            continue

        # ---- stage setup: frozen modules, a fresh optimizer, data, reference model
        set_frozen(model, stage.freeze)
        optimizer, params = build_optimizer(model, stage)
        if stage.type == "grpo" and stage.grpo.beta > 0 and ref_model is None:
            ref_model, _ = build_model(path, cfg, d, [], trainable=False)
        use_ref = ref_model if stage.type == "grpo" and stage.grpo.beta > 0 else None
        samples = load_stage_data(stage, si, cfg.seed, processor)
        sp = sampling_params(stage, cfg, model, tokenizer)
        start = 0
        if resume is not None and si == state["stage"]:  # mid-stage: weights, optimizer, reference, RNG
            checkpoint.load(resume, model=model, optimizer=optimizer, ref_model=use_ref, dist_info=d)
            start = state["stage_step"]
        else:
            if resume is not None:  # resumed at the end of the previous stage: its weights + RNG
                checkpoint.load(resume, model=model, optimizer=None, dist_info=d)
            if use_ref is not None:  # the stage's reference = its starting weights
                checkpoint.copy_weights(model, use_ref)
        bad = state.get("bad_steps", 0) if resume is not None and si == state["stage"] else 0
        if start and eval_due(cfg, si, False, global_step) and eval_missing(cfg, d, global_step):
            # the eval due after the step we resume from was lost with the crash: redo it first
            evaluate_and_log(cfg, d, model, processor, si, stage, global_step, start, logger, log)
        resume = None
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)  # FSDP2 shards
        log(f"\nstage {si} '{stage.name}' ({stage.type}): {stage.steps} steps, {len(samples)} samples, "
            f"frozen: {stage.freeze or 'nothing'}, {local:,} trainable parameters on this rank "
            f"({sum(p.numel() for p in params):,} in all)")

        for step in range(start, stage.steps):
            lr = stage.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            inject_fault(d, global_step)
            prompts = step_prompts(samples, stage, cfg.seed, si, step, d)
            if stage.is_sft_step(step):
                rec = sft_step(model, optimizer, params, processor, stage, cfg, d, prompts, dtype)
            else:
                rec = grpo_step(model, use_ref, optimizer, params, processor, stage, cfg, d, prompts,
                                global_step, sp, dtype)
            global_step += 1

            # ---- logging
            rec = {"step": global_step, "stage": si, "stage_name": stage.name, "stage_step": step + 1,
                   "kind": "sft" if stage.is_sft_step(step) else "grpo", "lr": lr, **rec,
                   "peak_mem_mb": metrics.peak_memory_mb(d.device)}
            logger.log(rec)
            if bar is not None:
                bar.update(1)
                post = {"stage": stage.name}
                if "reward" in rec:
                    post.update(reward=f"{rec['reward']:.3f}", len=f"{rec['response_length']:.1f}")
                else:
                    post.update(sft_loss=f"{rec['loss']:.3f}")
                bar.set_postfix(post)

            # ---- non-finite steps: skipped above (no update); too many in a row stop the run
            bad = bad + 1 if rec["skipped"] else 0
            if bad >= cfg.max_consecutive_bad_steps:
                raise RuntimeError(f"stage {stage.name!r} step {step + 1}: {bad} consecutive steps with a non-finite "
                                   f"loss or gradient norm (last: loss={rec['loss']}, grad_norm={rec['grad_norm']}); "
                                   f"stopping (max_consecutive_bad_steps={cfg.max_consecutive_bad_steps})")

            # ---- checkpoint: every K global steps and at the stage end
            stage_end = step + 1 == stage.steps
            if stage_end or (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0):
                checkpoint.save(ckpt_dir, global_step, model=model, optimizer=optimizer, ref_model=use_ref,
                                trainer_state={"stage": si, "stage_name": stage.name, "stage_step": step + 1,
                                               "global_step": global_step, "bad_steps": bad,
                                               "identity": identity},
                                dist_info=d, keep=cfg.keep_checkpoints)

            # ---- evaluation every eval.every steps (after the checkpoint: a crash before it is
            #      logged redoes it on resume); the stage end's comes after the export, below
            if not stage_end and eval_due(cfg, si, False, global_step):
                evaluate_and_log(cfg, d, model, processor, si, stage, global_step, step + 1, logger, log)

        if cfg.export_hf:
            export = checkpoint.export_hf(model, processor, export_dir(cfg, si, stage), d, out_dtype)
            log(f"stage {si} '{stage.name}' done: HF checkpoint at {export}")

        # ---- stage-end evaluation on the held-out sets (cfg.eval), logged as a kind="eval" record
        if eval_due(cfg, si, True, global_step):
            evaluate_and_log(cfg, d, model, processor, si, stage, global_step, stage.steps, logger, log)


def train(cfg: TrainConfig) -> list[dict]:
    """Run every stage of ``cfg`` (resuming when a checkpoint exists). Returns the per-stage summary."""
    d = parallel.init_distributed(cfg.device, timeout_s=cfg.dist_timeout_s)
    check_geometry(cfg, d)
    if d.device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar (ours); HF's load/save bars would interleave with it
    torch.manual_seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    out_dir, ckpt_dir = Path(cfg.output_dir), cfg.ckpt_dir
    log = print if d.is_main else (lambda *a, **k: None)

    # ---- output dirs: writable, and this run's alone (rank 0 holds the lock), before any model loads
    resume_guard.check_writable(out_dir, ckpt_dir, rank=d.rank)
    lock = on_rank0(d, lambda: resume_guard.RunLock(out_dir).acquire())

    # ---- preflight: every stage's data and the eval files, checked on rank 0 (staged.preflight); a
    #      bad file of the last stage fails here, once, not after the first stages have trained
    #      (data.max_prompt_tokens counts prompt tokens: that needs the processor, not the model)
    path = resolve_model_path(cfg, d) if preflight.needs_processor(cfg) else None
    proc = load_processor(path) if path is not None and d.is_main else None
    rows = parallel.broadcast_object(on_rank0(d, lambda: preflight.check_data(cfg, proc)))
    for line in preflight.resolve_steps(cfg, rows):  # epochs -> steps, on every rank
        log(line)
    image_cache.CACHE.set_limit(cfg.image_cache_mb)

    # ---- resume: the newest intact checkpoint of this same run, or a fresh start
    path = path or resolve_model_path(cfg, d)
    checkpoint.clean_temp(ckpt_dir, d)
    if cfg.resume == "never" and (n := checkpoint.remove_all(ckpt_dir, d)):
        log(f"[resume=never] removed {n} old checkpoints from {ckpt_dir}")
    resume = checkpoint.latest_intact(ckpt_dir, d, warn=log) if cfg.resume == "auto" else None
    identity = parallel.broadcast_object(resume_guard.run_identity(cfg, path) if d.is_main else None)
    state = checkpoint.read_trainer_state(resume) if resume else {"stage": 0, "stage_step": 0, "global_step": 0}
    if resume:
        on_rank0(d, lambda: resume_guard.check_resume(resume, state, identity, ckpt_dir, out_dir, log=log))
        log(f"resuming from {resume} (stage {state['stage']} '{cfg.stages[state['stage']].name}', "
            f"step {state['stage_step']} of it, global step {state['global_step']})")
        if state["stage"] == len(cfg.stages) - 1 and state["stage_step"] >= cfg.stages[-1].steps:
            log("every stage is already complete: nothing to train (resume=never starts over)")

    # ---- model: fp32 master weights, FSDP2 units, stage 0's frozen modules set before wrapping
    model, processor = build_model(path, cfg, d, cfg.stages[0].freeze)
    _, dtype = parallel.mixed_precision(cfg.precision, d.device)
    global_step = state["global_step"]
    logger = metrics.MetricsLogger(out_dir, enabled=d.is_main, tensorboard=cfg.tensorboard, resume_step=global_step)
    total_steps = sum(s.steps for s in cfg.stages)
    bar = None
    if d.is_main and cfg.progress and sys.stdout.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=global_step, desc="train", dynamic_ncols=True, file=sys.stdout)
    elif d.is_main and cfg.progress:  # a log file or a pipe: lines, not one 28k-character tqdm line
        bar = metrics.PlainProgress(total_steps, global_step)

    try:
        run_stages(cfg, d, model, processor, path, dtype, state, resume, logger, bar, identity=identity)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        if lock is not None:
            lock.release()

    # ---- end of run: per-stage summary and curves
    summary = []
    if d.is_main:
        records = metrics.read_jsonl(out_dir / metrics.METRICS_FILE)
        names = [s.name for s in cfg.stages]
        summary = metrics.stage_summary(records, names)
        print("\n" + metrics.format_summary(summary))
        if cfg.plot and (png := metrics.plot_curves(records, names, out_dir / metrics.PLOT_FILE)):
            print(f"curves: {png}")
        print(f"metrics: {out_dir / metrics.METRICS_FILE}")
    summary = parallel.broadcast_object(summary)
    return summary


USAGE = """usage: python -m staged.train [--config RECIPE.toml] [key.sub=value | --key.sub value]...

  no arguments      the embedded default (staged/configs/default.toml): a tiny model, CPU, minutes
  --config NAME     a TOML recipe: a path, or a shipped one (default, paper_qwen2_5_vl, paper_qwen3_vl)
  key.sub=value     override any field; list entries by index: stages.0.lr=1e-6,
                    --stages.1.freeze '["vision"]'. Values are TOML literals, else strings.
Fields and their meaning: staged/config.py (TrainConfig, StageConfig, ...)."""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return
    try:
        cfg = from_cli(args)
    except (ValueError, FileNotFoundError) as e:  # a bad config is the user's, not a crash
        # every rank reads the same config and fails alike, before any process group exists: the
        # first of each node says it (one message, as after startup: staged.parallel.fail; per
        # node, as a file missing on one node fails there only)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"staged.train: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        train(cfg)
    except BaseException as e:
        # Ranks > 1: say it once, abort the group, exit non-zero now; never a teardown barrier
        # that the other ranks, stuck in a collective, would never reach.
        parallel.fail(e)
        parallel.destroy_distributed()
        if not getattr(e, "one_message", False):
            raise
        # the user's to fix (a setting, a checkpoint, the data: RefuseStart, CheckpointError,
        # KVCacheTooSmall): one message, no traceback, exit status 2
        print(f"staged.train: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if parallel.destroy_distributed():
        parallel.exit_now(0)


if __name__ == "__main__":
    main()
